"""Every kind of bad update gets its own status, and leaves the ps as it was.

A test client speaks the raw protocol, so it can send what WorkerClient
never would.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from comind.auth import call_metadata
from comind.proto import comind_pb2 as pb
from comind.proto import comind_pb2_grpc as pb_grpc
from comind.tensors import Layout, chunks

TOKEN = "test-token"
AUTH = call_metadata(TOKEN)
# Over 1 MiB, so the model streams in two chunks and a NaN can hide in the second.
INITIAL = [np.linspace(-1, 1, 300 * 1000, dtype=np.float32).reshape(300, 1000), np.ones(10, np.float32)]
LAYOUT = Layout.of(INITIAL, ["kernel", "bias"])


class RawClient:
    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.ParameterServerStub(self.channel)

    def register(self, task: int) -> str:
        return self.stub.Register(pb.RegisterRequest(task_index=task), metadata=AUTH).member_id

    def push(self, header: pb.UpdateHeader | None, messages, metadata=AUTH) -> pb.PushReply:
        first = [] if header is None else [pb.UpdateChunk(header=header)]
        return self.stub.PushUpdate(iter(first + list(messages)), metadata=metadata, timeout=10)

    def model(self) -> tuple[int, bytes]:
        stream = self.stub.PullModel(pb.PullRequest(after_round=-1), metadata=AUTH, timeout=10)
        header = next(stream).header
        return header.round, b"".join(m.data for m in stream)


def update(member: str, round: int = 1, arrays=None, examples: int = 10, loss: float = 0.5, names=None):
    arrays = INITIAL if arrays is None else arrays
    header = pb.UpdateHeader(member_id=member, round=round, num_examples=examples, loss=loss, accuracy=0.5,
                             tensors=Layout.of(arrays, names).to_proto())
    return header, [pb.UpdateChunk(data=c) for c in chunks(Layout.of(arrays).pack(arrays))]


@pytest.fixture(scope="module")
def cluster():
    from conftest import PsProcess

    ps = PsProcess(["--num-workers", "2", "--rounds", "5", "--token", TOKEN, "--max-model-bytes", "10000000"])
    client = RawClient(ps.address)
    a, b = client.register(0), client.register(1)
    header = pb.UpdateHeader(member_id=a, tensors=LAYOUT.to_proto())
    messages = [pb.UpdateChunk(header=header)] + [pb.UpdateChunk(data=c) for c in chunks(LAYOUT.pack(INITIAL))]
    assert client.stub.Initialize(iter(messages), metadata=AUTH).accepted
    yield ps, client, a, b
    ps.stop()


def nudged(value: float):
    return [INITIAL[0] + np.float32(value), INITIAL[1] + np.float32(value)]


def with_value(index: int, position: tuple, value: float):
    arrays = [a.copy() for a in INITIAL]
    arrays[index][position] = value
    return arrays


BAD_UPDATES = {
    # name: (how to build header and messages from the two member ids, expected status, words in the message)
    "unknown worker": (lambda a: update("0" * 32), grpc.StatusCode.NOT_FOUND, "Unknown worker"),
    "wrong dtype": (lambda a: update(a, arrays=[INITIAL[0].astype(np.float64), INITIAL[1]]),
                    grpc.StatusCode.INVALID_ARGUMENT, "float64"),
    "wrong shape": (lambda a: update(a, arrays=[INITIAL[0].reshape(1000, 300), INITIAL[1]]),
                    grpc.StatusCode.INVALID_ARGUMENT, "[1000, 300]"),
    "missing tensor": (lambda a: update(a, arrays=INITIAL[:1]), grpc.StatusCode.INVALID_ARGUMENT, "expected 2"),
    "unknown dtype": (lambda a: (pb.UpdateHeader(member_id=a, round=1, num_examples=1, tensors=[
        pb.TensorSpec(name="x", dtype="object", shape=[3])]), []), grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
    "NaN in the second chunk": (lambda a: update(a, arrays=with_value(0, (299, 999), np.nan)),
                                grpc.StatusCode.OUT_OF_RANGE, "NaN or Inf"),
    "Inf": (lambda a: update(a, arrays=with_value(1, (3,), np.inf)), grpc.StatusCode.OUT_OF_RANGE, "NaN or Inf"),
    "NaN loss": (lambda a: update(a, loss=float("nan")), grpc.StatusCode.OUT_OF_RANGE, "finite"),
    "no examples": (lambda a: update(a, examples=0), grpc.StatusCode.INVALID_ARGUMENT, "at least one example"),
    "stale round": (lambda a: update(a, round=0), grpc.StatusCode.ABORTED, "Stale"),
    "future round": (lambda a: update(a, round=3), grpc.StatusCode.FAILED_PRECONDITION, "open round is 1"),
    "truncated stream": (lambda a: (update(a)[0], update(a)[1][:1]), grpc.StatusCode.DATA_LOSS, "Truncated"),
    "oversized stream": (lambda a: (update(a)[0], update(a)[1] + [pb.UpdateChunk(data=b"\0" * 8)]),
                         grpc.StatusCode.RESOURCE_EXHAUSTED, "Oversized"),
    "model over the size limit": (lambda a: update(a, arrays=[np.zeros((3000, 1000), np.float32), INITIAL[1]]),
                                  grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than this ps accepts"),
    "a message over gRPC's limit": (lambda a: (update(a)[0], [pb.UpdateChunk(data=b"\0" * (5 << 20))]),
                                    grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    "no header": (lambda a: (None, [pb.UpdateChunk(data=b"\0" * 16)]), grpc.StatusCode.INVALID_ARGUMENT, "header"),
    "two headers": (lambda a: (update(a)[0], [pb.UpdateChunk(header=update(a)[0])]),
                    grpc.StatusCode.INVALID_ARGUMENT, "Only the first message"),
}


def assert_unchanged(client: RawClient, a: str) -> None:
    assert client.model() == (0, LAYOUT.pack(INITIAL).tobytes())
    assert client.stub.Heartbeat(pb.HeartbeatRequest(member_id=a), metadata=AUTH).round == 0


@pytest.mark.parametrize("case", list(BAD_UPDATES))
def test_bad_update_gets_its_status_and_changes_nothing(cluster, case):
    ps, client, a, b = cluster
    build, code, words = BAD_UPDATES[case]
    header, messages = build(a)
    with pytest.raises(grpc.RpcError) as refused:
        client.push(header, messages)
    assert refused.value.code() == code, refused.value.details()
    assert words in refused.value.details()
    assert_unchanged(client, a)


@pytest.mark.parametrize("metadata", [(), call_metadata("wrong")], ids=["missing token", "wrong token"])
def test_bad_token_is_unauthenticated(cluster, metadata):
    ps, client, a, b = cluster
    with pytest.raises(grpc.RpcError) as refused:
        client.push(*update(a), metadata=metadata)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "COMIND_TOKEN" in refused.value.details()
    assert_unchanged(client, a)


def test_duplicate_is_idempotent_and_the_first_update_stands(cluster):
    # Runs last in this module: it completes round 1.
    ps, client, a, b = cluster
    assert not client.push(*update(a, arrays=nudged(1.0), examples=10)).duplicate
    assert client.push(*update(a, arrays=nudged(5.0), examples=10)).duplicate
    assert_unchanged(client, a)  # the round waits for b
    assert not client.push(*update(b, arrays=nudged(4.0), examples=30)).duplicate
    round, data = client.model()
    assert round == 1
    kernel, bias = LAYOUT.views(np.frombuffer(data, np.uint8))
    np.testing.assert_allclose(kernel, INITIAL[0] + 3.25, rtol=1e-6)  # (10 * 1 + 30 * 4) / 40
    np.testing.assert_allclose(bias, INITIAL[1] + 3.25, rtol=1e-6)
