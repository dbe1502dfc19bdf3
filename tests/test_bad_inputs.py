"""Every kind of bad update gets its own status, and leaves the ps as it was.

A test client speaks the raw protocol (tests/raw_protocol.py), so it can send
what WorkerClient never would. An update for a round that is not open is no
error: it gets its receipt (STALE, EARLY) and the current model follows.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest

from comind.auth import call_metadata
from comind.metrics import UPDATE_RESULTS
from comind.proto import comind_pb2 as pb
from comind.tensors import Layout
from processes import PsProcess
from raw_protocol import RENEWAL, RawClient, data_messages, update_messages
from scrape import Scrape, free_port

TOKEN = "test-token"
# Over 1 MiB, so the model streams in two chunks and a NaN can hide in the second.
INITIAL = [np.linspace(-1, 1, 300 * 1000, dtype=np.float32).reshape(300, 1000), np.ones(10, np.float32)]
NAMES = ["kernel", "bias"]
LAYOUT = Layout.of(INITIAL, NAMES)
#: A small change of every weight: what an honest worker sends.
DELTA = [np.full_like(INITIAL[0], 0.125), np.full_like(INITIAL[1], 0.125)]
#: A Round call's deadline long enough that the ps long-polls for the next model (it polls only for what is left
#: after the model's transfer time, 31 s here), so that what comes while it waits is read.
LONG = 60


class Cluster:
    """A ps with two members, a and b, and the initial model; a long lease, so neither expires meanwhile."""

    def __init__(self):
        self.start()

    def start(self) -> None:
        port = free_port()
        self.ps = PsProcess(["--num-workers", "2", "--rounds", "5", "--token", TOKEN, "--max-model-bytes",
                             "10000000", "--lease-seconds", "300", "--metrics-port", str(port)])
        self.metrics = lambda: Scrape(port)
        self.client = RawClient(self.ps.address, TOKEN)
        self.a, self.b = self.client.join(0), self.client.join(1)
        reply = self.client.initialize(self.a, INITIAL, NAMES)
        assert reply.receipt.result == pb.UPDATE_RESULT_ACCEPTED and reply.header.round == 0

    def stop(self) -> None:
        self.client.close()
        self.ps.stop()


@pytest.fixture(scope="module")
def started():
    cluster = Cluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster(started: Cluster) -> Cluster:
    """The module's ps, started again if a test (an expected failure) let an update in."""
    if started.metrics()("comind_updates_total", result="accepted"):
        started.stop()
        started.start()
    return started


def update(member: str, arrays=None, round: int = 1, **header) -> list[pb.WorkerMessage]:
    return update_messages(member, DELTA if arrays is None else arrays, round, **header)


def with_value(index: int, position: tuple, value: float):
    arrays = [a.copy() for a in DELTA]
    arrays[index][position] = value
    return arrays


def hello(member: str) -> pb.WorkerMessage:
    """A hello without an update, from a worker that holds the current model: its call waits for round 1."""
    return pb.WorkerMessage(hello=pb.Hello(member_id=member, have_round=0))


#: name: (the call's messages from member a's id, expected status, words in its details, whether it is a
#: refused update, counted once in comind_updates_total{result="rejected"}).
BAD_UPDATES: dict[str, tuple[Callable[[str], list], grpc.StatusCode, str, bool]] = {
    "unknown worker": (lambda a: update("0" * 32), grpc.StatusCode.NOT_FOUND, "Unknown worker", True),
    "wrong dtype": (lambda a: update(a, [DELTA[0].astype(np.float64), DELTA[1]]),
                    grpc.StatusCode.INVALID_ARGUMENT, "float64", True),
    "wrong shape": (lambda a: update(a, [DELTA[0].reshape(1000, 300), DELTA[1]]),
                    grpc.StatusCode.INVALID_ARGUMENT, "[1000, 300]", True),
    "missing tensor": (lambda a: update(a, DELTA[:1]), grpc.StatusCode.INVALID_ARGUMENT, "expected 2", True),
    "unknown dtype": (lambda a: [pb.WorkerMessage(hello=pb.Hello(member_id=a, have_round=0, update=pb.UpdateHeader(
        kind=pb.UPDATE_KIND_DELTA, round=1, num_examples=1,
        tensors=[pb.TensorSpec(name="x", dtype="object", shape=[3])])))],
        grpc.StatusCode.INVALID_ARGUMENT, "dtype", True),
    "unknown kind": (lambda a: update(a, kind=pb.UPDATE_KIND_UNSPECIFIED), grpc.StatusCode.INVALID_ARGUMENT,
                     "delta or an initial model", True),
    "initial model of another layout": (lambda a: update(a, [INITIAL[0].T], 0, have_round=-1,
                                                         kind=pb.UPDATE_KIND_INITIAL),
                                        grpc.StatusCode.INVALID_ARGUMENT, "expected 2", False),
    "NaN in the second chunk": (lambda a: update(a, with_value(0, (299, 999), np.nan)),
                                grpc.StatusCode.OUT_OF_RANGE, "NaN or Inf", True),
    "Inf": (lambda a: update(a, with_value(1, (3,), np.inf)), grpc.StatusCode.OUT_OF_RANGE, "NaN or Inf", True),
    "NaN loss": (lambda a: update(a, loss=float("nan")), grpc.StatusCode.OUT_OF_RANGE, "finite", True),
    "Inf accuracy": (lambda a: update(a, accuracy=float("-inf")), grpc.StatusCode.OUT_OF_RANGE, "finite", True),
    "no examples": (lambda a: update(a, examples=0), grpc.StatusCode.INVALID_ARGUMENT, "1 to 10000000 examples", True),
    "2**62 examples": (lambda a: update(a, examples=2**62), grpc.StatusCode.INVALID_ARGUMENT,
                       "COMIND_MAX_EXAMPLES_PER_UPDATE", True),
    "truncated stream": (lambda a: update(a)[:2], grpc.StatusCode.DATA_LOSS, "Truncated", True),
    "oversized last chunk": (lambda a: [*update(a)[:-1], pb.WorkerMessage(data=update(a)[-1].data + b"\0" * 8,
                                                                          end=True)],
                             grpc.StatusCode.RESOURCE_EXHAUSTED, "Oversized", True),
    "oversized stream": (lambda a: [*update(a)[:-1], pb.WorkerMessage(data=update(a)[-1].data),
                                    pb.WorkerMessage(data=b"\0" * 8, end=True)],
                         grpc.StatusCode.RESOURCE_EXHAUSTED, "Oversized", True),
    "model over the size limit": (lambda a: update(a, [np.zeros((3000, 1000), np.float32), DELTA[1]]),
                                  grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than this ps accepts", True),
    "a message over gRPC's limit": (lambda a: [*update(a)[:1], pb.WorkerMessage(data=b"\x00" * (5 << 20))],
                                    grpc.StatusCode.RESOURCE_EXHAUSTED, "", True),
    "no hello": (lambda a: data_messages(DELTA), grpc.StatusCode.INVALID_ARGUMENT, "must start with a hello", False),
    "renewal first": (lambda a: [RENEWAL], grpc.StatusCode.INVALID_ARGUMENT,
                      "must start with a hello", False),
    "an empty call": (lambda a: [], grpc.StatusCode.INVALID_ARGUMENT, "must start with a hello", False),
    # Two hellos (the old protocol's "two headers"): one before the update's bytes, one while the model is awaited.
    "a second hello before the bytes": (lambda a: [*update(a)[:1], hello(a), *update(a)[1:]],
                                        grpc.StatusCode.INVALID_ARGUMENT, "must follow its hello", True),
    "a renewal inside the bytes": (lambda a: [*update(a)[:2], RENEWAL, *update(a)[2:]],
                                   grpc.StatusCode.INVALID_ARGUMENT, "must follow its hello", True),
    "a second hello while waiting": (lambda a: [hello(a), hello(a)], grpc.StatusCode.INVALID_ARGUMENT,
                                     "carries one hello", False),
    "bytes without an update": (lambda a: [hello(a), *data_messages(DELTA)], grpc.StatusCode.INVALID_ARGUMENT,
                                "carries only renewals", False),
    "bytes with a hello without an update": (lambda a: [pb.WorkerMessage(hello=hello(a).hello, data=b"\0" * 8)],
                                             grpc.StatusCode.INVALID_ARGUMENT, "carries no bytes", False),
    "a renewal with the hello": (lambda a: [pb.WorkerMessage(hello=hello(a).hello, renewal=True)],
                                 grpc.StatusCode.INVALID_ARGUMENT, "carries no renewal", False),
}


def assert_unchanged(client: RawClient, a: str, metrics: Scrape) -> None:
    """The model, the round and a's part in it are those of the start: a's update for round 1 is still welcome."""
    reply = client.model(a)
    assert (reply.header.round, reply.data) == (0, LAYOUT.pack(INITIAL).tobytes())
    assert client.heartbeat(a).round == 0
    assert metrics("comind_updates_total", result="accepted") == 0
    assert metrics("comind_round") == 0


@pytest.mark.parametrize("case", list(BAD_UPDATES))
def test_bad_update_gets_its_status_and_changes_nothing(cluster, case):
    client, a, metrics = cluster.client, cluster.a, cluster.metrics
    build, code, words, _ = BAD_UPDATES[case]
    with pytest.raises(grpc.RpcError) as refused:
        client.call(build(a), timeout=LONG)
    assert refused.value.code() == code, refused.value.details()
    assert words in refused.value.details()
    assert_unchanged(client, a, metrics())
    assert "Traceback" not in cluster.ps.log()


@pytest.mark.parametrize("case", list(BAD_UPDATES))
def test_a_refused_update_is_counted_once(cluster, case):
    client, a, metrics = cluster.client, cluster.a, cluster.metrics
    build, *_, counted = BAD_UPDATES[case]
    before = metrics().updates()
    with pytest.raises(grpc.RpcError):
        client.call(build(a), timeout=LONG)
    after = metrics().updates()
    assert after == {**before, "rejected": before["rejected"] + counted}


#: name: (the call's messages from a's id, the receipt's result, the result counted).
RECEIPTS = {
    "stale round": (lambda a: update(a, round=0), pb.UPDATE_RESULT_STALE, "stale"),
    "future round": (lambda a: update(a, round=3), pb.UPDATE_RESULT_EARLY, "early"),
    "far future round": (lambda a: update(a, round=(1 << 63) - 1), pb.UPDATE_RESULT_EARLY, "early"),
    "initial model when the ps holds one": (lambda a: update(a, [w * 9 for w in INITIAL], 0, have_round=-1,
                                                             kind=pb.UPDATE_KIND_INITIAL),
                                            pb.UPDATE_RESULT_NOT_NEEDED, None),
}


@pytest.mark.parametrize("case", list(RECEIPTS))
def test_an_update_for_a_round_that_is_not_open_gets_a_receipt_and_the_model(cluster, case):
    """Not errors: the receipt says what became of the update (nothing), and the ps's model follows."""
    client, a, metrics = cluster.client, cluster.a, cluster.metrics
    build, result, counted = RECEIPTS[case]
    before = metrics().updates()
    reply = client.call(build(a))
    assert reply.receipt.result == result
    assert reply.header.ready and reply.header.round == 0 and not reply.header.done
    assert reply.data == LAYOUT.pack(INITIAL).tobytes()
    after = metrics().updates()
    assert after == {**before, **({counted: before[counted] + 1} if counted else {})}
    assert_unchanged(client, a, metrics())


@pytest.mark.parametrize("metadata", [(), call_metadata("wrong")], ids=["missing token", "wrong token"])
def test_bad_token_is_unauthenticated(cluster, metadata):
    client, a, metrics = cluster.client, cluster.a, cluster.metrics
    with pytest.raises(grpc.RpcError) as refused:
        client.call(update(a), metadata=metadata)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "COMIND_TOKEN" in refused.value.details()
    assert_unchanged(client, a, metrics())


def test_duplicate_is_idempotent_and_the_first_update_stands(cluster):
    # Runs last in this module: it completes round 1.
    client, a, b, metrics = cluster.client, cluster.a, cluster.b, cluster.metrics
    before = metrics().updates()
    assert client.send(a, [w + 1 for w in DELTA], examples=10).receipt.result == pb.UPDATE_RESULT_ACCEPTED
    assert client.send(a, [w + 5 for w in DELTA], examples=10).receipt.result == pb.UPDATE_RESULT_DUPLICATE
    reply = client.model(a)
    assert (reply.header.round, reply.data) == (0, LAYOUT.pack(INITIAL).tobytes())  # the round waits for b
    reply = client.call(update(b, [w + 4 for w in DELTA], examples=30))  # closes the round; round 1's model follows
    assert reply.receipt.result == pb.UPDATE_RESULT_ACCEPTED
    assert reply.header.round == 1
    kernel, bias = reply.weights()
    np.testing.assert_allclose(kernel, INITIAL[0] + 0.125 + 3.25, rtol=1e-6)  # (10 * 1 + 30 * 4) / 40
    np.testing.assert_allclose(bias, INITIAL[1] + 0.125 + 3.25, rtol=1e-6)
    after = metrics().updates()
    assert after == {**before, "accepted": 2, "duplicate": before["duplicate"] + 1}


def test_an_update_before_the_initial_model_is_a_failed_precondition(start_ps):
    port = free_port()
    ps = start_ps("--num-workers", "2", "--token", TOKEN, "--metrics-port", str(port))
    with RawClient(ps.address, TOKEN) as client:
        a = client.join(1)
        with pytest.raises(grpc.RpcError) as refused:
            client.send(a, DELTA)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
        assert "initial model" in refused.value.details()
        metrics = Scrape(port)
        assert metrics.updates() == {**dict.fromkeys(UPDATE_RESULTS, 0), "rejected": 1}
        assert metrics("comind_model_bytes") == 0 and metrics("comind_update_bytes_total", direction="received") == 0
        # A worker without an update waits for the chief's model: "not ready" when its long poll ends (after
        # what is left of the call's 32 s once the 30 s a transfer may take are set aside).
        reply = client.model(a, timeout=32)
        assert not reply.header.ready and reply.header.round == -1 and not reply.data
