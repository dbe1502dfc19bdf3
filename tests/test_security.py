"""Authentication and encryption against a real ps process.

Every refusal is checked for its exact gRPC status, and, through the ps's
Prometheus endpoint, for leaving the ps as it was: no member joined, no
model stored, no update counted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from comind import PsRefusal, PsUnreachable, WorkerClient
from comind.auth import TlsFiles
from comind.backoff import Backoff
from comind.certificates import Authority, Issued
from comind.proto import comind_pb2 as pb
from comind.protocol import RETRY_AFTER_KEY
from processes import ROOT
from raw_protocol import RawClient, update_messages
from scrape import Scrape, free_port

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-token"
FAST = ("--num-workers", "1", "--rounds", "2", "--exit-grace", "2")
WEIGHTS = [np.array([1.0, 2.0, 3.0], np.float32), np.array([[0.5, -0.5]], np.float32)]
MODEL_BYTES = sum(w.nbytes for w in WEIGHTS)  # 20
#: Where a refusal is expected: give up on an unreachable ps quickly, retrying often meanwhile.
SHORT = 2.0
QUICK_RETRIES = Backoff(base=0.05, cap=0.25)


# Helpers ----------------------------------------------------------------------


def assert_pristine(metrics: Scrape) -> None:
    """The ps holds no member, no model, and has counted no update."""
    assert metrics("comind_workers") == 0
    assert metrics("comind_model_bytes") == 0
    assert metrics("comind_round") == 0
    assert not any(metrics.updates().values())
    for direction in ("received", "sent"):
        assert metrics("comind_update_bytes_total", direction=direction) == 0


def start_metered(start_ps, *args: str, env: dict[str, str] | None = None):
    """A ps with metrics on a free port; returns it and a scrape function."""
    port = free_port()
    ps = start_ps(*FAST, "--metrics-port", str(port), *args, env=env)
    return ps, lambda: Scrape(port)


def initial_model(member_id: str, weights=WEIGHTS) -> list[pb.WorkerMessage]:
    return update_messages(member_id, weights, 0, have_round=-1, kind=pb.UPDATE_KIND_INITIAL)


def train(address: str, rounds: int = 2, **client_options) -> None:
    """One worker (the chief) runs the whole job and checks every model it gets back."""
    with WorkerClient(address, task_index=0, **client_options) as client:
        state = client.join(WEIGHTS)
        assert state.round == 0 and not state.done
        for actual, expected in zip(state.weights, WEIGHTS, strict=True):
            np.testing.assert_array_equal(actual, expected)
        for round in range(1, rounds + 1):
            local = [w + round for w in WEIGHTS]
            state = client.sync(local, num_examples=4, loss=1.0 / round, accuracy=0.5)
            assert state.round == round
            for actual, expected in zip(state.weights, local, strict=True):
                np.testing.assert_allclose(actual, expected)  # the mean of one update is that update
        assert state.done


def every_call(client: RawClient, metadata, member: str | None = None) -> dict:
    """One call of each RPC (both handler kinds), and each kind of Round call, with the given metadata and
    member id; named ``method (what)``."""
    member = member or secrets.token_hex(16)
    stub, options = client.stub, dict(metadata=metadata, timeout=5)
    return {
        "Join": lambda: stub.Join(pb.JoinRequest(task_index=0), **options),
        "Heartbeat": lambda: stub.Heartbeat(pb.HeartbeatRequest(member_id=member), **options),
        "Round (initial model)": lambda: client.call(initial_model(member), **options),
        "Round (update)": lambda: client.call(update_messages(member, WEIGHTS, 1), **options),
        "Round (model)": lambda: client.call([pb.WorkerMessage(hello=pb.Hello(member_id=member, have_round=-1))],
                                             **options),
        "ReportEval": lambda: stub.ReportEval(pb.EvalReport(member_id=member, round=0, loss=1.0), **options),
        "Leave": lambda: stub.Leave(pb.LeaveRequest(member_id=member), **options),
    }


def method(call_name: str) -> str:
    return call_name.split()[0]


def assert_status(call, code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    return caught.value


# Tokens -----------------------------------------------------------------------


@pytest.fixture(params=["flag", "file"])
def token_ps(request, start_ps, tmp_path: Path):
    """A ps that requires TOKEN, given by --token or by COMIND_TOKEN_FILE."""
    if request.param == "flag":
        return start_metered(start_ps, "--token", TOKEN)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")  # the trailing newline is dropped
    return start_metered(start_ps, env={"COMIND_TOKEN_FILE": str(token_file)})


def test_calls_without_or_with_a_wrong_token_are_unauthenticated(token_ps):
    ps, metrics = token_ps
    refusals = 0
    with RawClient(ps.address) as client:
        for metadata, reason in [((), "no token was sent"),
                                 ((("authorization", "Bearer wrong"),), "the token is wrong"),
                                 ((("authorization", TOKEN),), "the token is wrong"),  # no "Bearer "
                                 ((("authorization", f"Bearer {TOKEN}x"),), "the token is wrong")]:
            for name, call in every_call(client, metadata).items():
                error = assert_status(call, grpc.StatusCode.UNAUTHENTICATED)
                assert reason in error.details(), (name, error.details())
                assert "COMIND_TOKEN" in error.details()
                refusals += 1
                ps.wait_for(rf"Refused /comind\.v2\.ParameterServer/{method(name)}: {reason}\.")
    after = metrics()
    assert after("comind_auth_failures_total") == refusals == 28
    assert_pristine(after)  # no call got past the token check


def test_worker_client_with_a_wrong_or_no_token_is_refused_not_retried(token_ps):
    ps, metrics = token_ps
    for token, reason in [(None, "no token was sent"), ("wrong", "the token is wrong")]:
        with WorkerClient(ps.address, token=token, unreachable_timeout=SHORT) as client, \
                pytest.raises(PsRefusal, match=reason) as caught:
            client.join(WEIGHTS)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    after = metrics()
    assert after("comind_auth_failures_total") == 2  # one Join each: UNAUTHENTICATED is not retried
    assert_pristine(after)


def test_the_right_token_works_end_to_end(token_ps):
    ps, metrics = token_ps
    with RawClient(ps.address) as client:
        assert_status(lambda: client.stub.Join(pb.JoinRequest(), timeout=5), grpc.StatusCode.UNAUTHENTICATED)
    assert metrics()("comind_auth_failures_total") == 1
    train(ps.address, token=TOKEN)
    assert ps.wait() == 0
    assert "Round 2/2" in ps.log()
    # Only the one refusal above: none of the worker's calls was refused.
    assert len(re.findall(r"Refused /", ps.log())) == 1


def test_auth_failures_counter_ignores_authenticated_calls(token_ps):
    ps, metrics = token_ps
    with WorkerClient(ps.address, token=TOKEN) as good, RawClient(ps.address) as client:
        good.join(WEIGHTS)
        stub = client.stub
        assert_status(lambda: stub.Join(pb.JoinRequest(), timeout=5), grpc.StatusCode.UNAUTHENTICATED)
        assert_status(lambda: stub.Join(pb.JoinRequest(), metadata=(("authorization", "Bearer no"),), timeout=5),
                      grpc.StatusCode.UNAUTHENTICATED)
        during = metrics()
        assert during("comind_auth_failures_total") == 2
        assert during("comind_workers") == 1  # the refused Joins added nobody
        assert during("comind_model_bytes") == MODEL_BYTES
        good.sync(WEIGHTS, num_examples=1)
        good.sync(WEIGHTS, num_examples=1)
        assert metrics()("comind_auth_failures_total") == 2
    assert ps.wait() == 0


# TLS --------------------------------------------------------------------------


class Pki:
    """Certificates from comind.certificates, written as PEM files: a CA and its ps and worker, and a rogue CA."""

    def __init__(self, directory: Path):
        self.directory = directory
        authority, rogue = Authority("comind-test-ca"), Authority("rogue-ca")
        self.ca, self.rogue_ca = self._write("ca", authority.pem), self._write("rogue-ca", rogue.pem)
        self.server = self._files("ps", authority.issue("ps", server=True, hosts=["localhost", "127.0.0.1"]))
        self.client = self._files("worker", authority.issue("worker", client=True))
        self.other_client = self._files("other-worker", authority.issue("other-worker", client=True))
        self.rogue_client = self._files("impostor", rogue.issue("impostor", client=True))

    def _write(self, stem: str, pem: bytes) -> str:
        path = self.directory / f"{stem}.pem"
        path.write_bytes(pem)
        return str(path)

    def _files(self, stem: str, issued: Issued) -> TlsFiles:
        return TlsFiles(cert=self._write(stem, issued.cert), key=self._write(f"{stem}-key", issued.key))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def tls_ps(start_ps, pki: Pki, *, mutual: bool):
    args = ["--tls-cert", pki.server.cert, "--tls-key", pki.server.key]
    if mutual:
        args += ["--tls-ca", pki.ca]
    # GRPC_VERBOSITY=info: gRPC core logs why it failed a handshake, which tells the refusals apart.
    ps, metrics = start_metered(start_ps, *args, env={"GRPC_VERBOSITY": "info"})
    ps.wait_for(r"Listening on .* \(TLS\)")
    return ps, metrics


def assert_refused_by_tls(ps, metrics, tls: TlsFiles | None, *, server_reason: str | None = None,
                          client_reason: str | None = None) -> None:
    """A raw call and a WorkerClient over this channel both fail with UNAVAILABLE; the ps is untouched.

    ``server_reason``/``client_reason``: the TLS error that the ps logs, or that the client's
    status details carry, for the failed handshake.
    """
    with RawClient(ps.address, credentials=tls.channel_credentials() if tls else None) as raw:
        error = assert_status(lambda: raw.stub.Join(pb.JoinRequest(task_index=0), timeout=5),
                              grpc.StatusCode.UNAVAILABLE)
        if client_reason:
            assert client_reason in error.details()
        assert_status(lambda: raw.call(initial_model(secrets.token_hex(16)), timeout=5), grpc.StatusCode.UNAVAILABLE)
    with WorkerClient(ps.address, tls=tls or TlsFiles(), unreachable_timeout=SHORT,
                      backoff=QUICK_RETRIES) as client:
        with pytest.raises(PsUnreachable, match="UNAVAILABLE"):
            client.join(WEIGHTS)  # never gets a model
        assert client.round == -1
    assert_pristine(metrics())
    assert "joined" not in ps.log()
    if server_reason:
        ps.wait_for(rf"Handshake failed .*{server_reason}", timeout=5)


def test_tls_client_trusting_the_ca_works(start_ps, pki):
    ps, _metrics = tls_ps(start_ps, pki, mutual=False)
    train(ps.address, tls=TlsFiles(ca=pki.ca))
    assert ps.wait() == 0


def test_plain_text_client_cannot_talk_to_a_tls_ps(start_ps, pki):
    ps, metrics = tls_ps(start_ps, pki, mutual=False)
    assert_refused_by_tls(ps, metrics, None, server_reason="WRONG_VERSION_NUMBER")
    train(ps.address, tls=TlsFiles(ca=pki.ca))  # the ps still serves a proper client
    assert ps.wait() == 0


def test_tls_client_that_does_not_trust_the_ps_certificate_fails(start_ps, pki):
    ps, metrics = tls_ps(start_ps, pki, mutual=False)
    assert_refused_by_tls(ps, metrics, TlsFiles(ca=pki.rogue_ca), client_reason="CERTIFICATE_VERIFY_FAILED")


def test_mutual_tls_refuses_a_client_without_a_certificate(start_ps, pki):
    ps, metrics = tls_ps(start_ps, pki, mutual=True)
    assert_refused_by_tls(ps, metrics, TlsFiles(ca=pki.ca), server_reason="PEER_DID_NOT_RETURN_A_CERTIFICATE")


def test_mutual_tls_refuses_a_certificate_from_another_ca(start_ps, pki):
    ps, metrics = tls_ps(start_ps, pki, mutual=True)
    rogue = pki.rogue_client
    assert_refused_by_tls(ps, metrics, TlsFiles(cert=rogue.cert, key=rogue.key, ca=pki.ca),
                          server_reason="CERTIFICATE_VERIFY_FAILED")


def test_mutual_tls_accepts_a_certificate_from_the_ca(start_ps, pki):
    ps, _metrics = tls_ps(start_ps, pki, mutual=True)
    train(ps.address, tls=TlsFiles(cert=pki.client.cert, key=pki.client.key, ca=pki.ca))
    assert ps.wait() == 0


def test_mutual_tls_binds_a_member_id_to_the_certificate_that_registered_it(start_ps, pki):
    ps, metrics = tls_ps(start_ps, pki, mutual=True)
    mine = TlsFiles(cert=pki.client.cert, key=pki.client.key, ca=pki.ca)
    theirs = TlsFiles(cert=pki.other_client.cert, key=pki.other_client.key, ca=pki.ca)
    with RawClient(ps.address, credentials=mine.channel_credentials()) as owner, \
            RawClient(ps.address, credentials=theirs.channel_credentials()) as impostor:
        member = owner.join(0)
        calls = every_call(impostor, metadata=(), member=member)
        del calls["Join"]
        for name, call in calls.items():
            error = assert_status(call, grpc.StatusCode.PERMISSION_DENIED)
            assert "another client certificate" in error.details(), name
        after = metrics()
        assert after("comind_auth_failures_total") == 6
        assert after("comind_model_bytes") == 0  # the impostor's initial model changed nothing
        assert after("comind_update_bytes_total", direction="received") == 0
        assert after("comind_workers") == 1
        owner.heartbeat(member)  # its Leave removed nobody
        owner.stub.Leave(pb.LeaveRequest(member_id=member), timeout=5)
    assert len(re.findall(r"Refused a call with worker 0's member id from another client certificate", ps.log())) == 6
    train(ps.address, tls=mine)
    assert ps.wait() == 0


def test_mutual_tls_and_token_together(start_ps, pki):
    args = ["--tls-cert", pki.server.cert, "--tls-key", pki.server.key, "--tls-ca", pki.ca, "--token", TOKEN]
    ps, metrics = start_metered(start_ps, *args)
    tls = TlsFiles(cert=pki.client.cert, key=pki.client.key, ca=pki.ca)
    with WorkerClient(ps.address, tls=tls, unreachable_timeout=SHORT) as client:
        with pytest.raises(PsRefusal) as caught:
            client.join(WEIGHTS)  # a valid certificate does not stand in for the token
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert metrics()("comind_auth_failures_total") == 1
    assert_pristine(metrics())
    train(ps.address, tls=tls, token=TOKEN)
    assert ps.wait() == 0


# Member ids -------------------------------------------------------------------


def test_member_ids_are_random_and_a_made_up_one_is_not_found(start_ps):
    ps, metrics = start_metered(start_ps)
    with RawClient(ps.address) as client, WorkerClient(ps.address, task_index=0) as worker:
        stub = client.stub
        # Member ids are 128 random bits, unrelated to task index or order: there is nothing to guess.
        ids = [client.join(task) for task in (1, 2, 3)]
        assert len(set(ids)) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
        for member_id in ids:
            stub.Leave(pb.LeaveRequest(member_id=member_id), timeout=5)
        assert not any(member_id in ps.log() for member_id in ids)  # nor are they ever logged

        worker.join(WEIGHTS)
        before = metrics()
        assert before("comind_workers") == 1
        assert before("comind_update_bytes_total", direction="received") == MODEL_BYTES  # the initial model

        made_up = secrets.token_hex(16)
        poisoned = [np.full_like(w, 1e6) for w in WEIGHTS]
        error = assert_status(lambda: client.call(update_messages(made_up, poisoned, 1), timeout=5),
                              grpc.StatusCode.NOT_FOUND)
        assert made_up in error.details() and "Join again" in error.details()
        for call in [lambda: stub.Heartbeat(pb.HeartbeatRequest(member_id=made_up), timeout=5),
                     lambda: client.call([pb.WorkerMessage(hello=pb.Hello(member_id=made_up, have_round=-1))],
                                         timeout=5),
                     lambda: stub.ReportEval(pb.EvalReport(member_id=made_up, round=0, loss=9.0), timeout=5),
                     lambda: client.call(initial_model(made_up, poisoned), timeout=5)]:
            assert_status(call, grpc.StatusCode.NOT_FOUND)
        stub.Leave(pb.LeaveRequest(member_id=made_up), timeout=5)  # a no-op: removes nobody

        after = metrics()
        # (That the refused update counts as rejected: test_bad_inputs.py, "unknown worker".)
        assert after("comind_updates_total", result="accepted") == 0
        assert after("comind_workers") == 1
        assert after("comind_round") == 0
        assert after("comind_update_bytes_total", direction="received") == MODEL_BYTES  # no byte taken in
        assert math.isnan(after("comind_eval_loss"))  # no evaluation was taken from it

        # The round closes on the real worker's update alone; nothing of the made-up one is in the model.
        local = [w * 2 for w in WEIGHTS]
        state = worker.sync(local, num_examples=1)
        assert state.round == 1
        for actual, expected in zip(state.weights, local, strict=True):
            np.testing.assert_array_equal(actual, expected)
        state = worker.sync(local, num_examples=1)
        assert state.done
    assert ps.wait() == 0


#: Each TLS mistake a worker can make against a TLS ps (mutual or not), and what the worker says at once.
TLS_MISTAKES = {
    "untrusted ps certificate": (False, lambda pki: TlsFiles(ca=pki.rogue_ca),
                                 r"TLS handshake with the ps .* failed .*CERTIFICATE_VERIFY_FAILED.* Check that "
                                 r"COMIND_TLS_CA is the CA that signed"),
    "plain text against TLS": (False, lambda pki: TlsFiles(),
                               r"closed the connection: it speaks TLS, and this worker plain text\. Set COMIND_TLS_CA "
                               r"to the CA that signed the ps's certificate \(UNAVAILABLE: .*Socket closed\)"),
    "plain text against mutual TLS": (True, lambda pki: TlsFiles(),
                                      r"it speaks mutual TLS, and this worker plain text\. Set COMIND_TLS_CA .*, and "
                                      r"COMIND_TLS_CERT and COMIND_TLS_KEY to a client certificate"),
    "no client certificate": (True, lambda pki: TlsFiles(ca=pki.ca),
                              r"closed the connection after the TLS handshake: it requires a client certificate "
                              r"\(mutual TLS\)\. Set COMIND_TLS_CERT and COMIND_TLS_KEY"),
    "client certificate from another CA": (
        True, lambda pki: TlsFiles(cert=pki.rogue_client.cert, key=pki.rogue_client.key, ca=pki.ca),
        r"after the TLS handshake: it refuses this worker's client certificate '.*impostor\.pem'\. Check that the CA "
        r"the ps trusts \(its COMIND_TLS_CA\) signed it"),
}


@pytest.mark.parametrize("mistake", TLS_MISTAKES)
def test_a_worker_whose_tls_the_ps_cannot_accept_says_why_at_once(start_ps, pki, mistake):
    """No retry changes a certificate: the worker stops with the TLS reason, not after its unreachable timeout."""
    mutual, files, words = TLS_MISTAKES[mistake]
    ps, _metrics = tls_ps(start_ps, pki, mutual=mutual)
    started = time.monotonic()
    with WorkerClient(ps.address, tls=files(pki), unreachable_timeout=60) as client, \
            pytest.raises(PsUnreachable, match=words):
        client.join(WEIGHTS)
    assert time.monotonic() - started < 20


# Registrations ----------------------------------------------------------------


def retry_after(error: grpc.RpcError) -> float:
    [hint] = [float(value) for key, value in error.trailing_metadata() if key == RETRY_AFTER_KEY]
    return hint


def test_a_second_worker_of_a_task_index_is_refused_and_stops_but_a_restarted_one_joins(start_ps):
    ps, metrics = start_metered(start_ps, "--lease-seconds", "1")
    with WorkerClient(ps.address, task_index=0) as chief, RawClient(ps.address) as raw:
        chief.join(WEIGHTS)
        error = assert_status(lambda: raw.join(0, "a copy"), grpc.StatusCode.ALREADY_EXISTS)
        assert "Task index 0 is held by a live worker" in error.details()
        assert "COMIND_TASK_INDEX" in error.details()
        assert 0 < retry_after(error) <= 1
        # The duplicate waits once for the holder's lease; the chief renews it, so the duplicate stops.
        started = time.monotonic()
        with WorkerClient(ps.address, task_index=0, unreachable_timeout=60) as duplicate, \
                pytest.raises(PsRefusal, match="Task index 0 is held") as caught:
            duplicate.join(WEIGHTS)
        assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert time.monotonic() - started < 5
        # A worker killed and restarted in place: its old membership renews nothing, and the new process
        # joins once that lease ends.
        raw.join(1, "before the restart")
        with WorkerClient(ps.address, task_index=1) as restarted:
            assert restarted.join(WEIGHTS).round == 0
        # The raw copy, the duplicate twice, the restarted worker once.
        assert metrics()("comind_joins_refused_total", reason="taken") == 4
        chief.sync(WEIGHTS, num_examples=1)
        chief.sync(WEIGHTS, num_examples=1)
    assert ps.wait() == 0


def test_registrations_beyond_the_most_members_wait_for_room_as_the_ps_hints(start_ps):
    ps, metrics = start_metered(start_ps, "--max-members", "2", "--lease-seconds", "1")
    with RawClient(ps.address) as raw:
        for task in (5, 6):
            raw.join(task)  # then silent: their leases end in a second
        error = assert_status(lambda: raw.join(7), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "most members, 2 (COMIND_MAX_MEMBERS" in error.details()
        assert 0 < retry_after(error) <= 1
        assert metrics()("comind_joins_refused_total", reason="full") == 1
        started = time.monotonic()
        train(ps.address, unreachable_timeout=30)  # refused, then in once a lease ended
        assert time.monotonic() - started < 10
    assert ps.wait() == 0
    assert len(re.findall(r"Refused \d+ registrations?", ps.log())) <= 1  # counted, not logged one by one


def test_an_initial_model_from_a_worker_not_the_chief_is_refused_before_its_bytes(start_ps):
    ps, metrics = start_metered(start_ps)
    claim = pb.UpdateHeader(kind=pb.UPDATE_KIND_INITIAL, round=0,
                            tensors=[pb.TensorSpec(name="w", dtype="float32", shape=[1 << 14, 1 << 15])])  # 2 GiB
    with RawClient(ps.address) as raw:
        member = raw.join(1)

        def upload():
            yield pb.WorkerMessage(hello=pb.Hello(member_id=member, have_round=-1, update=claim))
            for _ in range(64):
                yield pb.WorkerMessage(data=bytes(1 << 20))

        error = assert_status(lambda: raw.call(upload(), timeout=10), grpc.StatusCode.PERMISSION_DENIED)
        assert "Only the chief (task 0) gives the initial model" in error.details()
    after = metrics()
    assert after("comind_update_bytes_total", direction="received") == 0
    assert after("comind_model_bytes") == 0
def test_a_tls_worker_against_a_plain_text_ps_says_so_at_once(start_ps, pki):
    ps = start_ps(*FAST)
    with WorkerClient(ps.address, tls=TlsFiles(ca=pki.ca), unreachable_timeout=60) as client, \
            pytest.raises(PsUnreachable, match=r"The ps at .* does not speak TLS \(.*WRONG_VERSION_NUMBER.*\): unset "
                                               r"COMIND_TLS_CA, COMIND_TLS_CERT and COMIND_TLS_KEY on this worker"):
        client.join(WEIGHTS)


def test_a_closed_socket_that_is_no_tls_refusal_is_retried_with_the_likely_cause(caplog):
    """A proxy with no ps behind it also closes connections: the worker retries, and says what to check."""
    with socket.create_server(("127.0.0.1", 0)) as proxy:
        def hang_up() -> None:
            with contextlib.suppress(OSError):
                while True:
                    proxy.accept()[0].close()

        threading.Thread(target=hang_up, daemon=True).start()
        address = f"127.0.0.1:{proxy.getsockname()[1]}"
        with caplog.at_level(logging.INFO), WorkerClient(address, unreachable_timeout=SHORT,
                                                         backoff=QUICK_RETRIES) as client, \
                pytest.raises(PsUnreachable, match=r"did not answer for 2 s .*(Socket closed|reset by peer).* If it "
                                                   r"runs, it may be refusing the TLS handshake: compare this worker's "
                                                   r"COMIND_TLS_CA"):
            client.join(WEIGHTS)
    retries = [r.getMessage() for r in caplog.records if "retrying joining" in r.getMessage()]
    assert len(retries) > 1 and all("may be refusing the TLS handshake" in r for r in retries)


@pytest.mark.parametrize("role", ["ps", "worker"])
def test_a_certificate_with_another_key_is_refused_at_start_naming_both(pki, role):
    cert, key = pki.client.cert, pki.rogue_client.key
    args = ["--tls-cert", cert, "--tls-key", key] + (["--tls-ca", pki.ca, "--ps-address", "127.0.0.1:1"]
                                                     if role == "worker" else [])
    result = subprocess.run([sys.executable, "-m", "comind", role, *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "COMIND_METRICS_PORT": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"The TLS certificate {cert!r} and key {key!r} do not go together: the key is not the certificate's. " \
           f"Set COMIND_TLS_CERT and COMIND_TLS_KEY" in result.stderr
    assert "Traceback" not in result.stderr
