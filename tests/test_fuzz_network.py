"""Fuzzing a real ps through gRPC: every hostile call ends in a specific status, and the ps lives on.

A barrage of hostile hellos, update headers, Round streams, field values and
raw bytes goes to one ``comind ps`` process. Every call must end with OK or
a status that names the problem (never UNKNOWN or INTERNAL, which mean a
bug, nor a deadline, which means a hang); afterwards the ps must still be
alive, hold about the memory it held before, log no traceback, and close
well-formed rounds.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from comind.client import WorkerClient, read_model
from comind.proto import comind_pb2 as pb
from comind.tensors import Layout
from fuzzing import INT64, NAMES, TENSOR_SPECS
from processes import PsProcess, rss_mb
from raw_protocol import RENEWAL, RawClient

TOKEN = "fuzz-token"
WEIGHTS = [np.linspace(-1, 1, 64 * 32, dtype=np.float32).reshape(64, 32), np.arange(8), np.ones(3, np.float16)]
LAYOUT = Layout.of(WEIGHTS)
#: What a call may end with: accepted, or refused for a reason the client can act on.
SPECIFIC = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DATA_LOSS,
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ALREADY_EXISTS}
#: Memory the barrage may leave behind in the ps (gRPC's and Python's caches).
RSS_GROWTH_BYTES = 64 << 20
#: Each call's deadline. A Round call long-polls for a newer model only for what is left of it after the model's
#: transfer time (over 30 s), so within this one it answers "not ready" at once instead of waiting.
DEADLINE = 10.0
METHODS = {  # name: (request streaming, response streaming)
    "Join": (False, False), "Heartbeat": (False, False), "Round": (True, True), "ReportEval": (False, False),
    "Leave": (False, False)}


def status_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def cluster():
    # A short lease: the members the barrage joins are gone soon after it.
    # No round closes before the last test: the chief sends updates only there, and no deadline passes.
    ps = PsProcess(["--num-workers", "1", "--rounds", "1000", "--token", TOKEN, "--lease-seconds", "2",
                    "--round-timeout", "1e6", "--max-model-bytes", "1000000"])
    chief = WorkerClient(ps.address, task_index=0, token=TOKEN)
    chief.join(WEIGHTS)
    client = RawClient(ps.address, TOKEN)
    baseline = rss_mb(ps.proc.pid) * (1 << 20)
    yield ps, chief, client, baseline
    chief.close()
    client.close()
    ps.stop()


FLOATS = st.floats(allow_nan=True, allow_infinity=True)
KINDS = st.one_of(st.sampled_from(pb.UpdateKind.values()), st.integers(-(1 << 31), (1 << 31) - 1))
HEADERS = st.builds(
    pb.UpdateHeader, kind=st.one_of(st.just(pb.UPDATE_KIND_DELTA), KINDS),
    round=st.one_of(st.integers(-1, 3), INT64), num_examples=st.one_of(st.integers(-1, 100), INT64),
    loss=st.one_of(st.just(0.5), FLOATS), accuracy=st.one_of(st.just(0.5), FLOATS),
    tensors=st.one_of(st.just(LAYOUT.to_proto()), st.lists(TENSOR_SPECS, max_size=4)))


def scaled(scale: float) -> bytes:
    """The packed weights with every float multiplied by ``scale`` (which may make them NaN or Inf)."""
    with np.errstate(all="ignore"):
        return LAYOUT.pack([w * np.asarray(scale, w.dtype) if w.dtype.kind == "f" else w for w in WEIGHTS]).tobytes()


PACKED = st.builds(scaled, st.one_of(st.floats(-2, 2), FLOATS))
STREAM_PARTS = st.one_of(
    PACKED.flatmap(lambda data: st.lists(st.integers(0, len(data)), max_size=3).map(
        lambda cuts: [data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)], strict=True)])),
    st.lists(st.binary(max_size=600), max_size=3))
#: Where the hello goes among the update's bytes, and what else comes.
ORDERS = ["hello first", "no end", "no hello", "two hellos", "renewals between", "renewals after"]


#: Who the hello names: mostly a member, so that the update gets past the first check.
CALLERS = st.sampled_from(["member", "member", "member", "stranger", "nobody"])


@given(st.one_of(HEADERS, st.none()), CALLERS, st.one_of(st.integers(-1, 2), INT64), STREAM_PARTS,
       st.sampled_from(ORDERS))
def test_hostile_round_calls_get_specific_statuses(cluster, header, caller, have_round, parts, order):
    _ps, _chief, client, _baseline = cluster
    # One worker process: task 1 has one live member, which every example gets back.
    member_id = (client.join(1, instance="fuzzer") if caller == "member" else
                 {"stranger": "0" * 32, "nobody": ""}[caller])
    hello = pb.Hello(member_id=member_id, have_round=have_round, update=header)
    messages = [pb.WorkerMessage(data=part) for part in parts]
    if messages and order != "no end":
        messages[-1].end = True
    if order == "renewals between":
        messages = [m for message in messages for m in (message, RENEWAL)]
    elif order == "renewals after":
        messages += [RENEWAL] * 2
    if order != "no hello":
        messages.insert(0, pb.WorkerMessage(hello=hello))
    if order == "two hellos":
        messages.insert(len(messages) // 2 + 1, pb.WorkerMessage(hello=hello))
    assert status_of(lambda: client.call(messages, timeout=DEADLINE)) in SPECIFIC


#: Ids of any text, up to megabytes (below gRPC's 4 MiB message limit).
MEMBER_IDS = st.one_of(NAMES, st.just("0" * 32), st.text(min_size=1, max_size=2).map(lambda t: t * (1 << 17)))


@given(st.sampled_from(sorted(METHODS)), MEMBER_IDS, st.one_of(st.integers(-3, 3), INT64), FLOATS, FLOATS,
       st.integers(-(1 << 31), (1 << 31) - 1))
def test_hostile_fields_get_specific_statuses(cluster, method, member_id, round, loss, accuracy, task_index):
    _ps, _chief, client, _baseline = cluster
    stub = client.stub
    requests = {
        "Join": lambda: pb.JoinRequest(task_index=task_index, description=member_id),
        "Heartbeat": lambda: pb.HeartbeatRequest(member_id=member_id),
        "ReportEval": lambda: pb.EvalReport(member_id=member_id, round=round, loss=loss, accuracy=accuracy),
        "Leave": lambda: pb.LeaveRequest(member_id=member_id),
        "Round": lambda: iter([pb.WorkerMessage(hello=pb.Hello(member_id=member_id, have_round=round))]),
    }

    def call():
        reply = getattr(stub, method)(requests[method](), metadata=client.metadata, timeout=DEADLINE)
        if method == "Round":
            received = read_model(reply, LAYOUT)
            assert received is None or LAYOUT.mismatch(Layout.of(received[0].weights)) is None
        elif method == "Join":
            assert stub.Leave(pb.LeaveRequest(member_id=reply.member_id), metadata=client.metadata) is not None

    # Narrower than SPECIFIC: a status that echoed a megabyte id would come back as RESOURCE_EXHAUSTED.
    allowed = {"Join": {"OK", "ALREADY_EXISTS"}, "Leave": {"OK"}, "Heartbeat": {"OK", "NOT_FOUND"},
               "Round": {"OK", "NOT_FOUND"},
               "ReportEval": {"OK", "NOT_FOUND", "OUT_OF_RANGE"}}
    assert status_of(call).name in allowed[method]


@given(st.sampled_from(sorted(METHODS)), st.lists(st.binary(max_size=300), min_size=1, max_size=3), st.booleans())
def test_raw_bytes_on_the_wire_get_specific_statuses(cluster, method, payloads, authenticated):
    """Bytes that are not a message (or happen to be one) through a generic call with no serializer."""
    _ps, _chief, client, _baseline = cluster
    streaming_request, streaming_response = METHODS[method]
    kind = f"{'stream' if streaming_request else 'unary'}_{'stream' if streaming_response else 'unary'}"
    call = getattr(client.channel, kind)(f"/comind.v2.ParameterServer/{method}")  # bytes in, bytes out
    request = iter(payloads) if streaming_request else payloads[0]
    metadata = client.metadata if authenticated else ()

    def send():
        reply = call(request, metadata=metadata, timeout=DEADLINE)
        if streaming_response:
            list(reply)

    code = status_of(send)
    assert code in SPECIFIC if authenticated else code == grpc.StatusCode.UNAUTHENTICATED


def test_the_ps_lives_on_and_serves_well_formed_rounds(cluster):
    """Runs last in this module, after the barrage."""
    ps, chief, _client, baseline = cluster
    assert ps.proc.poll() is None
    assert rss_mb(ps.proc.pid) * (1 << 20) < baseline + RSS_GROWTH_BYTES
    assert "Traceback" not in ps.log() and "Unexpected" not in ps.log()
    # Round 1 averages the chief's update with any of the barrage's that were accepted; by round 2 the
    # barrage's members have left or lost their lease, so the chief's update is the model.
    first = chief.sync([w + 1 for w in WEIGHTS], num_examples=1)
    assert first.round == 1 and LAYOUT.mismatch(Layout.of(first.weights)) is None
    assert all(np.isfinite(w).all() for w in first.weights)
    second = chief.sync([w + 2 for w in WEIGHTS], num_examples=1)
    assert second.round == 2
    for got, sent in zip(second.weights, WEIGHTS, strict=True):
        np.testing.assert_allclose(got, sent + 2, rtol=1e-6)
