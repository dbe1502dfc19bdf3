"""Asynchronous rounds (FedBuff): the staleness weight against its equation, against synchronous FedAvg, the
median over a buffer, retries and restarts (a real ps over gRPC, killed in the middle), refusals at start, and
`comind local` training the digits."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys

import grpc
import numpy as np
import pytest

from comind import WorkerClient
from comind.async_rounds import AsyncPolicy, UpdateIds, staleness_weight
from comind.proto import comind_pb2 as pb
from comind.rounds import RoundPolicy, Rounds, Verdict
from comind.tensors import Layout
from numpy_cluster import assert_finishes, read_history, start_worker
from processes import ROOT
from raw_protocol import RawClient, update_messages
from scrape import Scrape, free_port
from test_retry import FakeStub, _Responses, _RpcError

SHAPES = [(6, 4), (4,)]
ASYNC = ("--rounds-mode", "async", "--exit-grace", "2")


def test_the_staleness_weight_is_one_over_the_root_of_one_plus_tau():
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == 0.5
    assert staleness_weight(8, 0.5) == pytest.approx(1 / 3, rel=1e-15)
    assert staleness_weight(7, 1.0) == 0.125
    assert staleness_weight(5, 0.0) == 1.0
    with pytest.raises(ValueError, match="never negative"):
        staleness_weight(-1, 0.5)


def test_the_buffer_is_half_the_live_workers_at_least_one_unless_given():
    assert [AsyncPolicy().buffer(n) for n in (1, 2, 3, 4, 9)] == [1, 1, 1, 2, 4]
    assert AsyncPolicy(buffer_size=5).buffer(2) == 5


def test_a_version_takes_updates_within_the_staleness_bound_and_closes_at_k():
    clock = [0.0]
    rounds = Rounds(RoundPolicy(num_workers=3, total_rounds=10, asynchronous=AsyncPolicy(2, max_staleness=1)),
                    round=3, clock=lambda: clock[0])
    a, b = rounds.register(0), rounds.register(1)
    assert rounds.check(a, 4) is Verdict.ACCEPT   # trained from version 3, the newest
    assert rounds.check(a, 3) is Verdict.ACCEPT   # from version 2: tau 1
    assert rounds.check(a, 2) is Verdict.STALE    # tau 2 > max_staleness
    assert rounds.check(a, 5) is Verdict.EARLY    # from a version this ps has not made
    assert rounds.staleness(3) == 1
    rounds.record(a)
    rounds.record(a)  # a worker may send two updates to one version
    assert rounds.ready_to_close()
    rounds.begin_close()
    assert rounds.check(b, 4) is Verdict.ACCEPT   # not stale: it goes into the next buffer
    rounds.complete(4)
    assert rounds.buffered == 0 and not rounds.ready_to_close()


def test_a_version_not_full_at_its_deadline_closes_with_the_minimum():
    clock = [0.0]
    rounds = Rounds(RoundPolicy(num_workers=2, total_rounds=10, round_timeout=5, min_updates=2,
                                asynchronous=AsyncPolicy(4)), round=0, clock=lambda: clock[0])
    member = rounds.register(0)
    rounds.record(member)
    clock[0] = 6.0
    assert not rounds.ready_to_close() and rounds.overdue()
    rounds.record(member)
    assert rounds.ready_to_close()


def test_update_ids_survive_in_the_state_and_the_buffer_does_not():
    ids = UpdateIds()
    first, second = secrets.token_bytes(16), secrets.token_bytes(16)
    ids.take(0, first)
    ids.publish()
    ids.take(1, second)
    assert ids.seen(0, first) and ids.seen(1, second) and not ids.seen(1, first)
    restored = UpdateIds()
    restored.restore(ids.state())
    assert restored.seen(0, first) and not restored.seen(1, second)


@pytest.mark.parametrize("args, words", [
    (["--replicas-to-aggregate", "2"], "unset --replicas-to-aggregate"),
    (["--clients-per-round", "2", "--over-selection", "0.5"], "Unset --over-selection"),
    (["--dp-noise-multiplier", "1", "--dp-clip", "1"], "Worker-level differential privacy accounts synchronous"),
    (["--mode", "distributed"], "asynchronous rounds are for federated mode"),
    (["--rounds-mode", "later"], "--rounds-mode must be one of sync, async"),
    (["--aggregation", "median", "--num-workers", "5"], "median needs rounds of at least 3 updates"),
    (["--federated-eval-every", "2"], "set COMIND_FEDERATED_EVAL_EVERY to 0"),
])
def test_what_asynchronous_rounds_do_not_combine_with_is_refused_at_start(args, words):
    result = subprocess.run([sys.executable, "-m", "comind", "ps", "--rounds-mode", "async", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


class ReceiptLost(FakeStub):
    """Fails the first call that carries an update before its receipt, as a link that broke after the ps took
    it would; answers the others as a ps does."""

    def __init__(self, layout: Layout):
        super().__init__(layout, grpc.StatusCode.UNAVAILABLE, failures=0)
        self.ids: list[bytes] = []

    def Round(self, requests, timeout=None, metadata=None):
        hello = next(iter(requests)).hello
        if hello.HasField("update"):
            self.ids.append(hello.update.update_id)
            if len(self.ids) == 1:
                raise _RpcError(grpc.StatusCode.UNAVAILABLE)
        return _Responses(self._reply(hello, b""))


def test_a_retry_carries_the_same_update_id_and_the_next_update_a_new_one():
    weights = [np.zeros(10, np.float32)]
    client = WorkerClient("127.0.0.1:1")
    stub = client._stub = ReceiptLost(Layout.of(weights))  # type: ignore[assignment]
    client.join(weights)
    client.sync(weights, num_examples=1)
    client.sync(weights, num_examples=1)
    client.close()
    first, retry, second = stub.ids
    assert len(first) == 16 and retry == first and second != first


class Worker:
    """A raw client that pushes scripted updates with their ids."""

    def __init__(self, client: RawClient, task: int, examples: int):
        self.client, self.examples = client, examples
        self.member = client.join(task)

    def push(self, change: list[np.ndarray], trained_from: int, update_id: bytes | None = None) -> str:
        messages = update_messages(self.member, change, trained_from + 1, examples=self.examples,
                                   update_id=secrets.token_bytes(16) if update_id is None else update_id)
        reply = self.client.call(messages, wait_for_model=False)
        return pb.UpdateResult.Name(reply.receipt.result)

    def model(self) -> tuple[int, list[np.ndarray]]:
        reply = self.client.model(self.member)
        return reply.header.round, [w.astype(np.float64) for w in reply.weights()]


def changes(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.normal(size=shape).astype(np.float32) for shape in SHAPES]


def in_step(address: str, examples: list[int], versions: int) -> list[np.ndarray]:
    """Every worker trains from the newest model and pushes, one after another, ``versions`` times."""
    rng = np.random.default_rng(7)
    with RawClient(address) as client:
        workers = [Worker(client, task, n) for task, n in enumerate(examples)]
        workers[0].client.initialize(workers[0].member, [np.zeros(s, np.float32) for s in SHAPES])
        for version in range(versions):
            for worker in workers:
                assert worker.push(changes(rng), version) == "UPDATE_RESULT_ACCEPTED"
        round, model = workers[0].model()
        assert round == versions
        return model


@pytest.mark.parametrize("optimizer", ["fedavg", "fedadam"])
def test_with_k_equal_to_the_workers_in_step_async_is_synchronous_fedavg(start_ps, optimizer):
    examples = [50, 100, 250]
    common = ("--num-workers", "3", "--rounds", "4", "--exit-grace", "2", "--server-optimizer", optimizer)
    synchronous = in_step(start_ps(*common).address, examples, 4)
    asynchronous = in_step(start_ps(*common, *ASYNC, "--buffer-size", "3").address, examples, 4)
    for sync_tensor, async_tensor in zip(synchronous, asynchronous, strict=True):
        np.testing.assert_allclose(async_tensor, sync_tensor, rtol=0, atol=1e-6)
    if optimizer != "fedavg":
        return  # the server optimizers' own equations: tests/test_server_optimizers.py
    # And both are FedAvg: the example-weighted mean of each round's changes, added up.
    rng, expected = np.random.default_rng(7), [np.zeros(s) for s in SHAPES]
    for _ in range(4):
        pushed = [changes(rng) for _ in examples]
        for i in range(len(SHAPES)):
            expected[i] += np.average([p[i].astype(np.float64) for p in pushed], axis=0, weights=examples)
    for got, want in zip(asynchronous, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_stale_updates_are_weighted_by_their_staleness_and_refused_past_the_bound(start_ps):
    """K = 2, a = 0.5, max staleness 1, weighting by examples; each version is
    x + sum_k n_k s(tau_k) D_k / sum_k n_k with s(tau) = (1 + tau)^-0.5."""
    port = free_port()
    ps = start_ps("--num-workers", "3", "--rounds", "3", *ASYNC, "--buffer-size", "2", "--max-staleness", "1",
                  env={"COMIND_METRICS_PORT": str(port)})
    rng = np.random.default_rng(3)
    examples = [10, 30, 20]

    def s(tau: int) -> float:
        return (1 + tau) ** -0.5

    with RawClient(ps.address) as client:
        a, b, c = (Worker(client, task, n) for task, n in enumerate(examples))
        a.client.initialize(a.member, [np.zeros(shape, np.float32) for shape in SHAPES])
        x = [np.zeros(shape) for shape in SHAPES]

        def step(*parts: tuple[Worker, list[np.ndarray], int]) -> None:
            total = sum(w.examples for w, _, _ in parts)
            for i in range(len(SHAPES)):
                x[i] += sum(w.examples * s(tau) * d[i].astype(np.float64) for w, d, tau in parts) / total

        da0, db0, dc0 = changes(rng), changes(rng), changes(rng)
        assert a.push(da0, 0) == b.push(db0, 0) == "UPDATE_RESULT_ACCEPTED"   # version 1, both fresh
        step((a, da0, 0), (b, db0, 0))
        repeat = secrets.token_bytes(16)
        da1 = changes(rng)
        assert c.push(dc0, 0) == "UPDATE_RESULT_ACCEPTED"                     # tau 1
        assert a.push(da1, 1, repeat) == "UPDATE_RESULT_ACCEPTED"             # version 2
        step((c, dc0, 1), (a, da1, 0))
        assert a.push(da1, 1, repeat) == "UPDATE_RESULT_DUPLICATE"            # a retry whose receipt was lost
        assert b.push(changes(rng), 0) == "UPDATE_RESULT_STALE"               # tau 2 > 1
        with pytest.raises(grpc.RpcError) as refused:
            b.push(changes(rng), 1, update_id=b"")
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "random id of 16 bytes" in refused.value.details()
        db1, dc2 = changes(rng), changes(rng)
        assert b.push(db1, 1) == c.push(dc2, 2) == "UPDATE_RESULT_ACCEPTED"   # version 3: tau 1, tau 0
        step((b, db1, 1), (c, dc2, 0))
        round, model = a.model()
        scrape = Scrape(port)
    assert round == 3
    # The staleness of the six updates taken: 0, 0, 1, 0, 1, 0.
    assert (scrape("comind_staleness_versions_count"), scrape("comind_staleness_versions_sum")) == (6, 2)
    assert scrape("comind_staleness_versions_bucket", le="0.0") == 4
    updates = scrape.updates()
    assert {result: updates[result] for result in ("accepted", "duplicate", "stale", "rejected")} == \
        {"accepted": 6, "duplicate": 1, "stale": 1, "rejected": 1}
    assert (scrape("comind_rounds_completed_total"), scrape("comind_buffer_updates"),
            scrape("comind_buffer_size"), scrape("comind_quorum")) == (3, 0, 2, 1)
    for got, want in zip(model, x, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert ps.wait(timeout=30) == 0
    assert re.findall(r"Round \d+/3: 2 updates, .*, staleness ([\d.]+) on average", ps.log()) == ["0", "0.5", "0.5"]


def test_the_median_acts_on_the_buffers_scaled_updates(start_ps):
    ps = start_ps("--num-workers", "3", "--rounds", "2", *ASYNC, "--buffer-size", "3", "--aggregation", "median")
    rng = np.random.default_rng(5)
    with RawClient(ps.address) as client:
        a, b, c = (Worker(client, task, 10) for task in range(3))
        a.client.initialize(a.member, [np.zeros(shape, np.float32) for shape in SHAPES])
        first = [changes(rng) for _ in range(3)]
        assert [w.push(d, 0) for w, d in zip((a, b, c), first, strict=True)] == ["UPDATE_RESULT_ACCEPTED"] * 3
        second = [changes(rng) for _ in range(3)]
        # Trained from versions 1, 0 (tau 1: scaled by 2^-0.5) and 1.
        assert [w.push(d, v) for w, d, v in zip((a, b, c), second, (1, 0, 1), strict=True)] == \
            ["UPDATE_RESULT_ACCEPTED"] * 3
        round, model = a.model()
    assert round == 2
    scales = (1.0, 2 ** -0.5, 1.0)
    for i, got in enumerate(model):
        expected = np.median([d[i] for d in first], axis=0).astype(np.float64) + np.median(
            [np.float32(s) * d[i] for s, d in zip(scales, second, strict=True)], axis=0)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_a_restart_keeps_published_updates_applied_once_and_discards_the_partial_buffer(start_ps, tmp_path):
    flags = ("--num-workers", "2", "--rounds", "5", *ASYNC, "--buffer-size", "2", "--checkpoint-dir",
             str(tmp_path))
    first = start_ps(*flags)
    with RawClient(first.address) as client:
        a, b = Worker(client, 0, 10), Worker(client, 1, 10)
        a.client.initialize(a.member, [np.zeros(shape, np.float32) for shape in SHAPES])
        published, buffered = secrets.token_bytes(16), secrets.token_bytes(16)
        ones = [np.ones(shape, np.float32) for shape in SHAPES]
        assert a.push(ones, 0, published) == b.push(ones, 0) == "UPDATE_RESULT_ACCEPTED"  # version 1: x = 1
        assert a.push(ones, 1, buffered) == "UPDATE_RESULT_ACCEPTED"                     # in the buffer only
    first.kill()
    second = start_ps(*flags, port=first.port)
    second.wait_for(r"Resumed from \S+ at round 1")
    with RawClient(second.address) as client:
        a, b = Worker(client, 0, 10), Worker(client, 1, 10)
        assert a.push(ones, 0, published) == "UPDATE_RESULT_DUPLICATE"   # in version 1 already
        assert a.push(ones, 1, buffered) == "UPDATE_RESULT_ACCEPTED"     # lost with the buffer: taken now
        assert b.push(ones, 1) == "UPDATE_RESULT_ACCEPTED"
        round, model = a.model()
    assert round == 2
    for tensor in model:
        np.testing.assert_array_equal(tensor, 2.0)


def test_a_ps_killed_in_async_rounds_resumes_and_training_completes(start_ps, tmp_path):
    # int8 updates: an encoding decodes before the staleness weight scales.
    flags = ["--num-workers", "3", "--rounds", "30", *ASYNC, "--buffer-size", "2", "--lease-seconds", "2",
             "--update-encoding", "int8",
             "--checkpoint-dir", str(tmp_path / "checkpoints"), "--keep-checkpoints", "100"]
    first = start_ps(*flags)
    outs = [tmp_path / f"worker-{task}.jsonl" for task in range(3)]
    workers = [start_worker(first.address, task, outs[task], pause=0.02 * (1 + 2 * task)) for task in range(3)]
    first.wait_for(r"Round 8/30")
    first.kill()
    second = start_ps(*flags, port=first.port)
    persisted = int(second.wait_for(r"Resumed from \S+ at round (\d+)").group(1))
    for worker in workers:
        assert_finishes(worker, second)
    assert second.wait(timeout=60) == 0
    # Each version was made once, by one ps, in order (the first may have been killed between saving its last
    # version and logging it).
    before, after = ([int(r) for r in re.findall(r"Round (\d+)/30", ps.log())] for ps in (first, second))
    assert before == list(range(1, len(before) + 1)) and len(before) in (persisted - 1, persisted), before
    assert after == list(range(persisted + 1, 31)), after
    for out in outs:
        rounds = [h["round"] for h in read_history(out)]
        assert rounds == sorted(rounds) and rounds[-1] == 30, rounds  # versions never go backwards


def test_local_trains_the_digits_in_async_rounds(tmp_path):
    result = subprocess.run([sys.executable, "-m", "comind", "local", "--workers", "3", "--rounds-mode", "async",
                             "--buffer-size", "2", "--rounds", "6", "--output-dir", str(tmp_path)], cwd=ROOT,
                            env={**os.environ, "COMIND_METRICS_PORT": "0", "TF_CPP_MIN_LOG_LEVEL": "2"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Round 6/6: 2 updates", result.stdout), result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["final"]["eval_accuracy"] >= 0.90
    # The chief often gets the version it trained from back: it records each version once.
    rounds = [record["round"] for record in metrics["rounds"]]
    assert rounds == sorted(set(rounds)) and rounds[-1] == 6, rounds
    assert "asynchronous rounds" in (tmp_path / "logs" / "worker-1.log").read_text()
