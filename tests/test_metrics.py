"""The ps's Prometheus series, scraped from a real ps while two workers train."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from comind import WorkerClient
from comind.checkpoint import CheckpointStore
from comind.metrics import CHECKPOINT_BUCKETS, UPDATE_RESULTS, PsMetrics
from comind.proto import comind_pb2 as pb
from comind.tensors import Layout
from processes import ROOT
from raw_protocol import RawClient, update_messages
from scrape import Scrape, free_port

ROUNDS = 3
WEIGHTS = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([0.25, -1.0], np.float32)]
MODEL_BYTES = sum(w.nbytes for w in WEIGHTS)  # 32
#: Per worker (task index): examples per round, and loss and accuracy of round r (1-based).
EXAMPLES = {0: 8, 1: 24}


def loss_of(task: int, round: int) -> float:
    return 2.0 / round + task


def accuracy_of(task: int, round: int) -> float:
    return 0.1 * round + 0.25 * task


EVAL_LOSS, EVAL_ACCURACY = 0.375, 0.8125


def weighted_mean(value_of, round: int) -> float:
    return sum(EXAMPLES[t] * value_of(t, round) for t in EXAMPLES) / sum(EXAMPLES.values())


@pytest.mark.timeout(120)
def test_ps_metrics_after_two_workers_train_three_rounds(start_ps):
    port = free_port()
    # A long exit grace: the ps must still be up when we scrape after the last round.
    ps = start_ps("--num-workers", "2", "--rounds", str(ROUNDS), "--exit-grace", "60", "--metrics-port", str(port))
    clients = {task: WorkerClient(ps.address, task_index=task, description=f"worker {task}") for task in EXAMPLES}
    rounds_seen: dict[int, list[int]] = {}
    figures_seen: dict[int, list[float]] = {}  # each round's training loss and accuracy, with its model
    errors: list[BaseException] = []

    def work(task: int) -> None:
        try:
            client = clients[task]
            state = client.join(WEIGHTS)
            seen, figures = [state.round], []
            for round in range(1, ROUNDS + 1):
                local = [w + task + round for w in WEIGHTS]
                state = client.sync(local, num_examples=EXAMPLES[task], loss=loss_of(task, round),
                                    accuracy=accuracy_of(task, round))
                seen.append(state.round)
                figures += [state.train_loss, state.train_accuracy]
            assert state.done
            if client.is_chief:
                client.report_eval(ROUNDS, EVAL_LOSS, EVAL_ACCURACY)
            rounds_seen[task], figures_seen[task] = seen, figures
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)

    try:
        threads = [threading.Thread(target=work, args=(task,)) for task in EXAMPLES]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads), "a worker hung:\n" + ps.log()
        if errors:
            raise errors[0]
        assert rounds_seen == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
        # Every worker gets the figures of the round's line with its model: the chief's metrics.json shows them.
        means = [mean for r in range(1, ROUNDS + 1) for mean in (weighted_mean(loss_of, r),
                                                                 weighted_mean(accuracy_of, r))]
        assert figures_seen == {task: pytest.approx(means) for task in EXAMPLES}
        ps.wait_for(r"Round 3 evaluation")  # the eval report has been applied
        samples = Scrape(port)  # both workers are still connected
        clients[1].close()
        ps.wait_for(r"Worker 1 left; 1 live")
        assert Scrape(port)("comind_workers") == 1
        assert ps.proc.poll() is None  # still waiting for the chief to leave
    finally:
        for client in clients.values():
            client.close()

    assert samples("comind_round") == ROUNDS
    assert samples("comind_rounds_completed_total") == ROUNDS
    assert samples("comind_round_duration_seconds_count") == ROUNDS
    assert samples("comind_round_duration_seconds_bucket", le="+Inf") == ROUNDS
    assert samples("comind_round_duration_seconds_sum") > 0
    assert samples("comind_train_loss") == pytest.approx(weighted_mean(loss_of, ROUNDS))
    assert samples("comind_train_accuracy") == pytest.approx(weighted_mean(accuracy_of, ROUNDS))
    assert samples("comind_eval_loss") == EVAL_LOSS
    assert samples("comind_eval_accuracy") == EVAL_ACCURACY
    assert samples("comind_workers") == 2
    assert samples("comind_model_bytes") == MODEL_BYTES
    updates = len(EXAMPLES) * ROUNDS
    assert samples.updates() == {**NONE, "accepted": updates}
    assert samples("comind_auth_failures_total") == 0
    # Received: the chief's initial model, then every update. Sent: each worker's model at
    # join, then one per worker per round.
    assert samples("comind_update_bytes_total", direction="received") == MODEL_BYTES * (1 + updates)
    assert samples("comind_update_bytes_total", direction="sent") == MODEL_BYTES * (len(EXAMPLES) + updates)

    assert ps.wait(timeout=30) == 0  # it exits once both workers left, well before the grace ends
    assert "The ps stopped at round 3." in ps.log()
    assert "had not left" not in ps.log()


def test_labelled_series_read_zero_before_any_event():
    registry = CollectorRegistry()
    PsMetrics(registry)
    for result in UPDATE_RESULTS:
        assert registry.get_sample_value("comind_updates_total", {"result": result}) == 0
    for direction in ("received", "sent"):
        assert registry.get_sample_value("comind_update_bytes_total", {"direction": direction}) == 0
    assert registry.get_sample_value("comind_auth_failures_total") == 0
    assert registry.get_sample_value("comind_rounds_completed_total") == 0
    assert registry.get_sample_value("comind_round_duration_seconds_count") == 0
    assert registry.get_sample_value("comind_workers") == 0


def test_metrics_of_two_ps_registries_are_independent():
    first, second = CollectorRegistry(), CollectorRegistry()
    a, b = PsMetrics(first), PsMetrics(second)
    a.updates.labels("accepted").inc(3)
    b.update_bytes.labels("sent").inc(7)
    assert first.get_sample_value("comind_updates_total", {"result": "accepted"}) == 3
    assert second.get_sample_value("comind_updates_total", {"result": "accepted"}) == 0
    assert first.get_sample_value("comind_update_bytes_total", {"direction": "sent"}) == 0
    assert second.get_sample_value("comind_update_bytes_total", {"direction": "sent"}) == 7


#: Every result counted zero times.
NONE = dict.fromkeys(UPDATE_RESULTS, 0)


def receipt(client: RawClient, member: str, change, **header) -> int:
    """Sends an update (a change of WEIGHTS) for round 1; returns its receipt's result."""
    return client.send(member, change, 1, **header).receipt.result


def round_1(client: RawClient, member: str) -> list[np.ndarray]:
    """The model of round 1, once it is published."""
    reply = client.model(member, have_round=0)
    assert reply.header.round == 1
    return reply.weights()


@contextlib.contextmanager
def initialized_ps(start_ps):
    """A ps for one round with two workers that joined, and an initial model."""
    port = free_port()
    ps = start_ps("--num-workers", "2", "--rounds", "1", "--exit-grace", "5", "--metrics-port", str(port))
    with RawClient(ps.address) as client:
        chief, other = client.join(0), client.join(1)
        assert client.initialize(chief, WEIGHTS).receipt.result == pb.UPDATE_RESULT_ACCEPTED
        yield ps, port, client, chief, other


@pytest.mark.timeout(60)
def test_duplicate_updates_are_counted_and_change_nothing(start_ps):
    with initialized_ps(start_ps) as (ps, port, client, chief, other):
        first = [np.full_like(w, 1) for w in WEIGHTS]
        assert receipt(client, chief, first) == pb.UPDATE_RESULT_ACCEPTED
        assert receipt(client, chief, [w * 100 for w in WEIGHTS]) == pb.UPDATE_RESULT_DUPLICATE

        samples = Scrape(port)
        assert samples.updates() == {**NONE, "accepted": 1, "duplicate": 1}
        # The initial model and the first update; the duplicate was answered before its tensors were read.
        assert samples("comind_update_bytes_total", direction="received") == 2 * MODEL_BYTES
        assert samples("comind_round") == 0  # the round still waits for the other worker

        second = [np.full_like(w, 3) for w in WEIGHTS]
        assert receipt(client, other, second) == pb.UPDATE_RESULT_ACCEPTED
        for actual, start, a, b in zip(round_1(client, chief), WEIGHTS, first, second, strict=True):
            np.testing.assert_allclose(actual, start + (a + b) / 2)  # the duplicate is nowhere in the average
        assert Scrape(port).updates() == {**NONE, "accepted": 2, "duplicate": 1}
        for member in (chief, other):
            client.stub.Leave(pb.LeaveRequest(member_id=member), timeout=5)
    assert ps.wait(timeout=30) == 0


def test_every_update_result_the_ps_counts_is_pre_created():
    registry = CollectorRegistry()
    PsMetrics(registry)
    assert registry.get_sample_value("comind_updates_total", {"result": "duplicate"}) == 0


@pytest.mark.timeout(60)
def test_a_duplicate_caught_at_commit_is_counted(start_ps):
    with initialized_ps(start_ps) as (ps, port, client, chief, other):

        # Call A sends its hello, whose update header passes every check, then stalls; call B of the
        # same worker and round arrives whole meanwhile and is accepted; then A's tensors come in.
        gate = threading.Event()
        stalled = [w * 100 for w in WEIGHTS]

        def stalling():
            hello, *data = update_messages(chief, stalled, 1)
            yield hello
            gate.wait(10)
            yield from data

        late: list[int] = []
        thread = threading.Thread(
            target=lambda: late.append(client.call(stalling(), timeout=20, wait_for_model=False).receipt.result))
        thread.start()
        time.sleep(1.0)  # A's header is checked (a local call answers in milliseconds)
        first = [np.full_like(w, 1) for w in WEIGHTS]
        assert receipt(client, chief, first) == pb.UPDATE_RESULT_ACCEPTED
        gate.set()
        thread.join(timeout=20)
        assert late == [pb.UPDATE_RESULT_DUPLICATE]  # caught at commit: the model is safe

        second = [np.full_like(w, 3) for w in WEIGHTS]
        assert receipt(client, other, second) == pb.UPDATE_RESULT_ACCEPTED
        for actual, start, a, b in zip(round_1(client, chief), WEIGHTS, first, second, strict=True):
            np.testing.assert_allclose(actual, start + (a + b) / 2)
        samples = Scrape(port)
        for member in (chief, other):
            client.stub.Leave(pb.LeaveRequest(member_id=member), timeout=5)
    assert ps.wait(timeout=30) == 0
    assert samples.updates() == {**NONE, "accepted": 2, "duplicate": 1}  # three updates, three results


def test_checkpoint_buckets_tell_apart_the_writes_of_small_and_large_models(tmp_path):
    """A small model's checkpoint takes milliseconds: in the round buckets, every write fell in the lowest one."""
    metrics = PsMetrics(registry := CollectorRegistry())
    # The basic model on Fashion-MNIST (0.4 MB), and a model a hundred times its size.
    for weights in ([np.ones((784, 128), np.float32), np.ones(128, np.float32), np.ones((128, 10), np.float32)],
                    [np.ones(10_000_000, np.float32)]):
        layout = Layout.of(weights)
        started = time.perf_counter()
        CheckpointStore(tmp_path / str(len(weights))).save(1, layout, layout.pack(weights))
        metrics.checkpoint_seconds.observe(time.perf_counter() - started)
    counts = [registry.get_sample_value("comind_checkpoint_duration_seconds_bucket", {"le": str(float(bound))})
              for bound in CHECKPOINT_BUCKETS]
    assert counts[0] == 0 and 1 in counts, dict(zip(CHECKPOINT_BUCKETS, counts, strict=True))


def test_the_ps_serves_metrics_only_on_the_address_it_listens_on(start_ps):
    port = free_port()
    start_ps("--metrics-port", str(port))  # listens on 127.0.0.1
    assert Scrape(port)("comind_round") == 0
    # Every 127/8 address is this machine's loopback: a server bound to all addresses would answer on this one too.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=5).close()


@pytest.mark.timeout(180)
def test_local_gives_the_ps_and_each_worker_its_own_metrics_port_and_says_where(tmp_path):
    base = free_port(3)
    local = subprocess.Popen([sys.executable, "-m", "comind", "local", "--workers", "2", "--rounds", "100000",
                              "--interval-steps", "1", "--metrics-port", str(base), "--output-dir", str(tmp_path),
                              "--log-level", "debug"],  # every round's line shown
                             cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert local.stdout is not None
        lines = [next(local.stdout)]
        assert (f"metrics on http://127.0.0.1:{base}/metrics (the ps) and ports {base + 1} to {base + 2} "
                f"(workers 0 to 1)") in lines[0]
        lines += itertools.takewhile(lambda line: not line.startswith("Round 2/"), local.stdout)
        assert Scrape(base)("comind_round") >= 1
        for task in range(2):
            assert Scrape(base + 1 + task)("comind_worker_round") >= 1
            assert f"Metrics on http://127.0.0.1:{base + 1 + task}/metrics" in \
                (tmp_path / "logs" / f"worker-{task}.log").read_text()
    finally:
        local.send_signal(signal.SIGINT)
        local.wait(timeout=60)
