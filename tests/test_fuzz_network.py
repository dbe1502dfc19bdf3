"""Fuzzing a real ps through gRPC: every hostile call ends in a specific status, and the ps lives on.

A barrage of hostile headers, chunk streams, field values and raw bytes
goes to one ``comind ps`` process. Every call must end with OK or a status
that names the problem (never UNKNOWN or INTERNAL, which mean a bug, nor a
deadline, which means a hang); afterwards the ps must still be alive, hold
about the memory it held before, log no traceback, and close well-formed
rounds.
"""

from __future__ import annotations

import contextlib

import grpc
import numpy as np
import pytest
from fuzzing import INT64, NAMES, TENSOR_SPECS
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from comind.auth import call_metadata
from comind.client import WorkerClient, read_model
from comind.proto import comind_pb2 as pb
from comind.proto import comind_pb2_grpc as pb_grpc
from comind.tensors import Layout
from conftest import rss_mb

TOKEN = "fuzz-token"
AUTH = call_metadata(TOKEN)
WEIGHTS = [np.linspace(-1, 1, 64 * 32, dtype=np.float32).reshape(64, 32), np.arange(8), np.ones(3, np.float16)]
LAYOUT = Layout.of(WEIGHTS)
#: What a call may end with: accepted, or refused for a reason the client can act on.
SPECIFIC = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE,
            grpc.StatusCode.DATA_LOSS, grpc.StatusCode.RESOURCE_EXHAUSTED}
#: Memory the barrage may leave behind in the ps (gRPC's and Python's caches).
RSS_GROWTH_BYTES = 64 << 20
METHODS = {  # name: (request streaming, response streaming)
    "Register": (False, False), "Heartbeat": (False, False), "Initialize": (True, False),
    "PushUpdate": (True, False), "PullModel": (False, True), "ReportEval": (False, False), "Leave": (False, False)}


def status_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def cluster():
    from conftest import PsProcess

    # A short lease: the members the barrage registers are gone soon after it.
    # No round closes before the last test: the chief pushes only there, and no deadline passes.
    ps = PsProcess(["--num-workers", "1", "--rounds", "1000", "--token", TOKEN, "--lease-seconds", "2",
                    "--round-timeout", "1e6", "--max-model-bytes", "1000000"])
    chief = WorkerClient(ps.address, task_index=0, token=TOKEN)
    chief.join(WEIGHTS)
    channel = grpc.insecure_channel(ps.address)
    stub = pb_grpc.ParameterServerStub(channel)
    baseline = rss_mb(ps.proc.pid) * (1 << 20)
    yield ps, chief, channel, stub, baseline
    chief.close()
    channel.close()
    ps.stop()


def member(stub) -> str:
    return stub.Register(pb.RegisterRequest(task_index=1), metadata=AUTH).member_id


FLOATS = st.floats(allow_nan=True, allow_infinity=True)
HEADERS = st.builds(
    pb.UpdateHeader, round=st.one_of(st.integers(-1, 3), INT64), num_examples=st.one_of(st.integers(-1, 100), INT64),
    loss=st.one_of(st.just(0.5), FLOATS), accuracy=st.one_of(st.just(0.5), FLOATS),
    tensors=st.one_of(st.just(LAYOUT.to_proto()), st.lists(TENSOR_SPECS, max_size=4)))


def scaled(scale: float) -> bytes:
    """The packed weights with every float multiplied by ``scale`` (which may make them NaN or Inf)."""
    with np.errstate(all="ignore"):
        return LAYOUT.pack([w * np.asarray(scale, w.dtype) if w.dtype.kind == "f" else w for w in WEIGHTS]).tobytes()


PACKED = st.builds(scaled, st.one_of(st.floats(-2, 2), FLOATS))
STREAM_PARTS = st.one_of(
    PACKED.flatmap(lambda data: st.lists(st.integers(0, len(data)), max_size=3).map(
        lambda cuts: [data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)])])),
    st.lists(st.binary(max_size=600), max_size=3))


@given(st.sampled_from(["PushUpdate", "Initialize"]), HEADERS, st.booleans(), st.booleans(), STREAM_PARTS,
       st.sampled_from(["header first", "no header", "two headers"]))
def test_hostile_update_streams_get_specific_statuses(cluster, method, header, registered, stranger, parts, order):
    ps, chief, channel, stub, baseline = cluster
    header.member_id = member(stub) if registered else ("0" * 32 if stranger else header.member_id)
    messages = [pb.UpdateChunk(data=part) for part in parts]
    if order != "no header":
        messages.insert(0, pb.UpdateChunk(header=header))
    if order == "two headers":
        messages.insert(len(messages) // 2 + 1, pb.UpdateChunk(header=header))
    code = status_of(lambda: getattr(stub, method)(iter(messages), metadata=AUTH, timeout=10))
    assert code in SPECIFIC


#: Ids of any text, up to megabytes (below gRPC's 4 MiB message limit).
MEMBER_IDS = st.one_of(NAMES, st.just("0" * 32), st.text(min_size=1, max_size=2).map(lambda t: t * (1 << 17)))


@given(st.sampled_from(["Register", "Heartbeat", "ReportEval", "Leave", "PullModel"]), MEMBER_IDS,
       st.one_of(st.integers(-3, 3), INT64), FLOATS, FLOATS, st.integers(-(1 << 31), (1 << 31) - 1))
def test_hostile_fields_get_specific_statuses(cluster, method, member_id, round, loss, accuracy, task_index):
    ps, chief, channel, stub, baseline = cluster
    requests = {
        "Register": lambda: pb.RegisterRequest(task_index=task_index, description=member_id),
        "Heartbeat": lambda: pb.HeartbeatRequest(member_id=member_id),
        "ReportEval": lambda: pb.EvalReport(member_id=member_id, round=round, loss=loss, accuracy=accuracy),
        "Leave": lambda: pb.LeaveRequest(member_id=member_id),
        "PullModel": lambda: pb.PullRequest(member_id=member_id, after_round=round),
    }

    def call():
        reply = getattr(stub, method)(requests[method](), metadata=AUTH, timeout=deadline(method, round))
        if method == "PullModel":
            state = read_model(reply, LAYOUT)
            assert state is None or LAYOUT.mismatch(Layout.of(state.weights)) is None
        elif method == "Register":
            assert stub.Leave(pb.LeaveRequest(member_id=reply.member_id), metadata=AUTH) is not None

    # Narrower than SPECIFIC: a status that echoed a megabyte id would come back as RESOURCE_EXHAUSTED.
    allowed = {"Register": {"OK"}, "Leave": {"OK"}, "Heartbeat": {"OK", "NOT_FOUND"},
               "PullModel": {"OK", "NOT_FOUND"} | long_poll(round), "ReportEval": {"OK", "NOT_FOUND", "OUT_OF_RANGE"}}
    assert status_of(call).name in allowed[method]


def deadline(method: str, after_round: int = -1) -> float:
    """Seconds a call may take; the ps answers a pull for a model that does not exist yet a second
    before the deadline, so a short one keeps those quick."""
    return 1.2 if method == "PullModel" and after_round >= 0 else 10.0


def long_poll(after_round: int) -> set[str]:
    """What a pull may end with besides OK and NOT_FOUND: a long poll for a round that does not exist
    yet (the barrage's ps stays at round 0) may meet its deadline on a loaded machine."""
    return {"DEADLINE_EXCEEDED"} if after_round >= 0 else set()


@given(st.sampled_from(sorted(METHODS)), st.lists(st.binary(max_size=300), min_size=1, max_size=3), st.booleans())
def test_raw_bytes_on_the_wire_get_specific_statuses(cluster, method, payloads, authenticated):
    """Bytes that are not a message (or happen to be one) through a generic call with no serializer."""
    ps, chief, channel, stub, baseline = cluster
    streaming_request, streaming_response = METHODS[method]
    kind = f"{'stream' if streaming_request else 'unary'}_{'stream' if streaming_response else 'unary'}"
    call = getattr(channel, kind)(f"/comind.v1.ParameterServer/{method}")  # bytes in, bytes out
    request = iter(payloads) if streaming_request else payloads[0]
    metadata = AUTH if authenticated else ()
    after_round = -1
    if method == "PullModel":
        with contextlib.suppress(DecodeError):
            after_round = pb.PullRequest.FromString(payloads[0]).after_round

    def send():
        reply = call(request, metadata=metadata, timeout=deadline(method, after_round))
        if streaming_response:
            list(reply)

    code = status_of(send)
    if authenticated:
        assert code in SPECIFIC or code.name in long_poll(after_round)
    else:
        assert code == grpc.StatusCode.UNAUTHENTICATED


def test_the_ps_lives_on_and_serves_well_formed_rounds(cluster):
    """Runs last in this module, after the barrage."""
    ps, chief, channel, stub, baseline = cluster
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
    for got, sent in zip(second.weights, WEIGHTS):
        np.testing.assert_allclose(got, sent + 2, rtol=1e-6)
