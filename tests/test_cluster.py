"""A real ps process and real clients on loopback: averaging, failures, restarts."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from comind import WorkerClient
from comind.checkpoint import CheckpointStore
from comind.tensors import Layout
from numpy_cluster import assert_finishes, expected_value, read_history, start_worker
from processes import ROOT
from scrape import Scrape, free_port


def run_clients(address: str, examples: list[int], rounds_seed: int = 0) -> dict[int, dict]:
    """Clients in threads that push random weights; returns, per task, what it pushed and received."""
    histories: dict[int, dict] = {i: {"pushed": {}, "received": {}} for i in range(len(examples))}
    errors: list[BaseException] = []

    def work(task: int) -> None:
        try:
            rng = np.random.default_rng([rounds_seed, task])
            initial = [rng.normal(size=(64, 32)).astype(np.float32), rng.normal(size=(32,)).astype(np.float32)]
            with WorkerClient(address, task_index=task) as client:
                state = client.join(initial)
                histories[task]["received"][state.round] = state.weights
                while not state.done:
                    local = [w + rng.normal(size=w.shape).astype(np.float32) for w in state.weights]
                    histories[task]["pushed"][state.round + 1] = local
                    state = client.sync(local, num_examples=examples[task], loss=0.1 * task, accuracy=0.5)
                    histories[task]["received"][state.round] = state.weights
        except BaseException as error:  # noqa: BLE001 - surfaced in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(task,)) for task in range(len(examples))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return histories


def test_global_model_is_the_exact_example_weighted_average(start_ps):
    examples = [50, 100, 250]
    ps = start_ps("--num-workers", "3", "--rounds", "4", "--exit-grace", "5")
    histories = run_clients(ps.address, examples)

    assert ps.wait() == 0
    chief_initial = histories[0]["received"][0]
    for task in histories:  # every worker started from the chief's weights
        for mine, chiefs in zip(histories[task]["received"][0], chief_initial, strict=True):
            np.testing.assert_array_equal(mine, chiefs)
    for round in range(1, 5):
        pushed = [histories[task]["pushed"][round] for task in histories]
        for i in range(2):
            stacked = np.stack([p[i].astype(np.float64) for p in pushed])
            expected = np.average(stacked, axis=0, weights=examples).astype(np.float32)
            for task in histories:
                np.testing.assert_allclose(histories[task]["received"][round][i], expected, rtol=2e-6, atol=2e-6)
    assert len(re.findall(r"Round \d+/4: 3 updates", ps.log())) == 4


@pytest.mark.parametrize("how", ["lease", "deadline"])
def test_a_vanished_worker_does_not_stop_the_others(start_ps, tmp_path, how):
    # "lease": the worker's lease ends first; "deadline": its lease outlives
    # the round's deadline, which then closes the round with the other two.
    flags = {"lease": ["--lease-seconds", "2", "--round-timeout", "120"],
             "deadline": ["--lease-seconds", "120", "--round-timeout", "1.5", "--min-updates", "2"]}[how]
    ps = start_ps("--num-workers", "3", "--rounds", "4", "--exit-grace", "3", *flags)
    outs = [tmp_path / f"worker-{task}.jsonl" for task in range(3)]
    workers = [start_worker(ps.address, task, outs[task], pause=0.3 if task == 2 else 0.0) for task in range(3)]
    ps.wait_for(r"Round 1/4: 3 updates")
    workers[2].send_signal(signal.SIGKILL)  # mid-way through its pretend training for round 2
    workers[2].wait()

    for worker in workers[:2]:
        assert_finishes(worker, ps)
    assert ps.wait(timeout=60) == 0
    log = ps.log()
    if how == "lease":
        assert "lease ended" in log
    for round in (2, 3, 4):
        assert re.search(rf"Round {round}/4: 2 updates", log), log
    for out in outs[:2]:
        history = read_history(out)
        assert [h["round"] for h in history] == [0, 1, 2, 3, 4]
        assert history[-1]["done"]


def test_ps_killed_mid_training_resumes_from_its_checkpoint(start_ps, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    flags = ["--num-workers", "2", "--rounds", "12", "--exit-grace", "5", "--lease-seconds", "2",
             "--checkpoint-dir", str(checkpoints), "--keep-checkpoints", "100"]
    examples, deltas = [100, 300], [1.0, -0.5]
    first = start_ps(*flags)
    outs = [tmp_path / f"worker-{task}.jsonl" for task in range(2)]
    workers = [start_worker(first.address, task, outs[task], examples=examples[task], delta=deltas[task],
                            pause=0.15) for task in range(2)]
    first.wait_for(r"Round 4/12")
    first.kill()
    persisted = max(int(p.stem.split("-")[1]) for p in checkpoints.glob("round-*.npz"))

    second = start_ps(*flags, port=first.port)
    resumed = second.wait_for(r"Resumed from \S+ at round (\d+)")
    assert int(resumed.group(1)) == persisted >= 4
    for worker in workers:
        assert_finishes(worker, second)
    assert second.wait(timeout=60) == 0

    # No round lost or repeated: each was closed by exactly one ps, in order.
    closed = [int(r) for log in (first.log(), second.log()) for r in re.findall(r"Round (\d+)/12", log)]
    assert closed[: persisted] == list(range(1, persisted + 1))
    assert closed[-(12 - persisted):] == list(range(persisted + 1, 13))
    assert sorted(int(p.stem.split("-")[1]) for p in checkpoints.glob("round-*.npz")) == list(range(13))
    # Every worker saw every round once, with the weights exact averaging gives.
    for out in outs:
        history = read_history(out)
        assert [h["round"] for h in history] == list(range(13))
        for h in history:
            assert h["uniform"]
            np.testing.assert_allclose(h["values"], expected_value(h["round"], examples, deltas), rtol=1e-5)
    saved = np.load(checkpoints / "round-000000012.npz")
    assert int(saved["round"]) == 12
    np.testing.assert_allclose(saved["tensor_00000"], expected_value(12, examples, deltas), rtol=1e-5)


def test_a_ps_killed_mid_training_continues_with_the_same_server_optimizer_moments(start_ps, tmp_path):
    """fedadam's moments and step count are saved with each round: a ps SIGKILLed and restarted makes exactly
    the models an uninterrupted ps makes."""
    flags = ["--num-workers", "2", "--rounds", "10", "--exit-grace", "5", "--lease-seconds", "2",
             "--keep-checkpoints", "100", "--server-optimizer", "fedadam", "--server-learning-rate", "0.05"]

    def train(name: str, kill_after: int | None = None) -> Path:
        checkpoints = tmp_path / name
        ps = start_ps(*flags, "--checkpoint-dir", str(checkpoints))
        workers = [start_worker(ps.address, task, tmp_path / f"{name}-{task}.jsonl", examples=[100, 300][task],
                                delta=[1.0, -0.5][task], delta_step=[0.25, -0.125][task], pause=0.15)
                   for task in range(2)]
        if kill_after:
            ps.wait_for(rf"Round {kill_after}/10")
            ps.kill()
            ps = start_ps(*flags, "--checkpoint-dir", str(checkpoints), port=ps.port)
            assert int(ps.wait_for(r"Resumed from \S+ at round (\d+)").group(1)) >= kill_after
        for worker in workers:
            assert_finishes(worker, ps)
        assert ps.wait(timeout=60) == 0
        return checkpoints

    straight, interrupted = train("straight"), train("interrupted", kill_after=4)
    for round in range(11):
        expected, resumed = (np.load(path / f"round-{round:09d}.npz") for path in (straight, interrupted))
        assert expected.files == resumed.files
        for key in expected.files:
            np.testing.assert_array_equal(resumed[key], expected[key], err_msg=f"round {round}, {key}")
    final = np.load(interrupted / "round-000000010.npz")
    assert int(final["state/server_optimizer/fedadam/step"]) == 10
    assert np.abs(final["state/server_optimizer/fedadam/v/00000"]).min() > 0


def test_sigterm_persists_and_exits_cleanly(start_ps, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    ps = start_ps("--num-workers", "1", "--rounds", "1000", "--checkpoint-dir", str(checkpoints))
    worker = start_worker(ps.address, 0, tmp_path / "worker.jsonl", pause=0.05)
    ps.wait_for(r"Round 3/1000")
    ps.proc.send_signal(signal.SIGTERM)
    assert ps.wait(timeout=30) == 0
    last_logged = max(int(r) for r in re.findall(r"Round (\d+)/1000", ps.log()))
    assert max(int(p.stem.split("-")[1]) for p in checkpoints.glob("round-*.npz")) == last_logged
    assert "Stopping on a signal" in ps.log()
    worker.kill()
    worker.wait()


def test_ps_stops_rather_than_publish_a_round_it_cannot_persist(start_ps, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    ps = start_ps("--num-workers", "1", "--rounds", "1000", "--checkpoint-dir", str(checkpoints))
    worker = start_worker(ps.address, 0, tmp_path / "worker.jsonl", pause=0.05)
    ps.wait_for(r"Round 2/1000")
    shutil.rmtree(checkpoints)
    checkpoints.write_text("not a directory any more")
    assert ps.wait(timeout=30) == 1
    failed = int(ps.wait_for(r"Cannot write the checkpoint of round (\d+)").group(1))
    assert "the ps resumes from round" in ps.log()
    rounds_seen = [h["round"] for h in read_history(tmp_path / "worker.jsonl")]
    assert max(rounds_seen) < failed  # no worker ever held the round that was not saved
    worker.kill()
    worker.wait()


def run_ps(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comind", "ps", "--listen", "127.0.0.1:0", *args], cwd=ROOT,
                          env={**os.environ, "COMIND_METRICS_PORT": "0"}, capture_output=True, text=True,
                          timeout=60)


def test_a_ps_whose_checkpoints_are_all_unreadable_refuses_to_start(tmp_path):
    (tmp_path / "round-000000011.npz").write_bytes(b"not a zip")
    result = run_ps("--checkpoint-dir", str(tmp_path))
    assert result.returncode == 2
    assert f"None of the 1 checkpoints in {tmp_path} is readable" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_ps_resumed_past_its_last_round_serves_the_final_model_then_exits_0(start_ps, tmp_path):
    """A Kubernetes Job's ps that stopped after its final checkpoint must end with success, not serve forever."""
    weights = [np.zeros(3, np.float32)]
    CheckpointStore(tmp_path).save(6, Layout.of(weights), Layout.of(weights).pack(weights))
    ps = start_ps("--checkpoint-dir", str(tmp_path), "--rounds", "3", "--exit-grace", "60")
    ps.wait_for("round 6, and training is 3 rounds: training is already done")
    with WorkerClient(ps.address, task_index=1) as client:
        state = client.join(weights)
    assert (state.round, state.done) == (6, True)
    # The worker that came for the final model left: the ps does not wait out its grace period.
    assert ps.wait(timeout=30) == 0
    # Nobody comes: it exits after the grace period.
    alone = start_ps("--checkpoint-dir", str(tmp_path), "--rounds", "3", "--exit-grace", "1")
    assert alone.wait(timeout=30) == 0
    assert "had not left" not in alone.log()


def test_with_after_training_serve_the_ps_stays_up_after_the_last_round_until_stopped(start_ps, tmp_path):
    weights = [np.zeros(3, np.float32)]
    CheckpointStore(tmp_path).save(6, Layout.of(weights), Layout.of(weights).pack(weights))
    ps = start_ps("--checkpoint-dir", str(tmp_path), "--rounds", "3", "--exit-grace", "1",
                  env={"COMIND_AFTER_TRAINING": "serve"})
    for _ in range(2):  # workers come and go; it serves each the final model
        with WorkerClient(ps.address, task_index=1) as client:
            assert client.join(weights).done
    with pytest.raises(subprocess.TimeoutExpired):
        ps.wait(timeout=3)  # past the grace period
    ps.proc.send_signal(signal.SIGTERM)
    assert ps.wait(timeout=30) == 0


def test_workers_are_back_within_a_lease_of_a_ps_that_was_away_for_long(start_ps, tmp_path):
    """gRPC's reconnect back-off grows to minutes: uncapped, workers came back 11.5 s after a ps that was away for
    60 s listened again, and rounds closed without them."""
    checkpoints = tmp_path / "checkpoints"
    flags = ["--num-workers", "2", "--rounds", "8", "--exit-grace", "5", "--checkpoint-dir", str(checkpoints)]
    first = start_ps(*flags)
    outs = [tmp_path / f"worker-{task}.jsonl" for task in range(2)]
    workers = [start_worker(first.address, task, outs[task], pause=0.2) for task in range(2)]
    first.wait_for(r"Round 2/8")
    first.kill()
    time.sleep(20)  # long enough for gRPC's back-off to pass 10 s
    second = start_ps(*flags, port=first.port)
    listening = time.monotonic()
    second.wait_for(r"Worker 1 joined")
    second.wait_for(r"Worker 0 joined")
    back = time.monotonic() - listening
    for worker in workers:
        assert_finishes(worker, second)
    print(f"\n  workers back {back:.1f} s after the ps listened again, 20 s after it went away")
    assert back < 5
    assert not re.search(r"Round \d+/8: 1 updates", second.log()), second.log()


def test_an_update_the_killed_ps_had_taken_goes_to_its_replacement(start_ps, tmp_path):
    """A ps SIGKILLed after it took one worker's update for the open round, and restarted from its checkpoint:
    the update died with it, so its sender sends it again, and the round closes at once with both updates (it
    waited for its deadline while the sender took the first ps's receipt as the last word)."""
    checkpoints, ports = tmp_path / "checkpoints", [free_port(), free_port()]
    # A lease that a loaded machine's heartbeats keep: no round here closes for a lease's end.
    flags = ["--num-workers", "2", "--rounds", "3", "--exit-grace", "5", "--lease-seconds", "5",
             "--round-timeout", "60", "--checkpoint-dir", str(checkpoints)]
    examples, deltas = [100, 300], [1.0, -0.5]
    first = start_ps(*flags, "--metrics-port", str(ports[0]))
    outs = [tmp_path / f"worker-{task}.jsonl" for task in range(2)]
    # Worker 1 trains for 2 s a round, worker 0 at once: the ps dies with worker 0's update for round 2 taken.
    workers = [start_worker(first.address, task, outs[task], examples=examples[task], delta=deltas[task],
                            pause=2.0 * task) for task in range(2)]
    first.wait_for(r"Round 1/3: 2 updates")
    # Accepted so far: round 1's two updates, and worker 0's for round 2 (an initial model is no update).
    while Scrape(ports[0])("comind_updates_total", result="accepted") < 3:
        time.sleep(0.02)
    first.kill()
    assert "Round 2/3" not in first.log()

    second = start_ps(*flags, "--metrics-port", str(ports[1]), port=first.port)
    second.wait_for(r"Resumed from \S+ at round 1\.")
    restarted = time.monotonic()
    # Well before its deadline (60 s), and with both updates.
    assert second.wait_for(r"Round 2/3: (\d+) updates", timeout=20).group(1) == "2", second.log()
    print(f"\nthe round open at the crash closed {time.monotonic() - restarted:.1f} s after the restart")
    # Now, while the ps still serves (it exits once the workers leave after round 3): round 2's two updates were
    # taken, and worker 0's for round 3 may be too; none was a duplicate.
    scrape = Scrape(ports[1])
    assert scrape("comind_updates_total", result="accepted") in (2, 3)
    assert scrape("comind_updates_total", result="duplicate") == 0
    second.wait_for(r"Round 3/3: 2 updates")
    for worker in workers:
        assert_finishes(worker, second)
    assert second.wait(timeout=30) == 0
    # Each update applied once: the weights of every round are those exact averaging gives.
    for out in outs:
        history = read_history(out)
        assert [h["round"] for h in history] == [0, 1, 2, 3]
        for h in history:
            np.testing.assert_allclose(h["values"], expected_value(h["round"], examples, deltas), rtol=1e-5)
