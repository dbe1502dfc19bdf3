"""Secure aggregation with a real ps and real worker processes: the exact mean, the ps holding no update in the
clear, workers SIGKILLed at each stage, a round that fails for lack of survivors and starts again, and the settings
the ps refuses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from comind.proto import comind_pb2 as pb
from numpy_cluster import assert_finishes, read_history, start_worker
from processes import ROOT
from raw_protocol import RawClient, update_header
from scrape import Scrape, free_port

SPY = str(ROOT / "tests" / "secagg_spy")
DELTAS = [0.5, 1.0, 1.5]


def spied(folder: Path) -> dict[str, str]:
    return {"PYTHONPATH": f"{SPY}:{ROOT}", "COMIND_TEST_SECAGG_RECORD": str(folder)}


def run(start_ps, tmp_path: Path, *flags: str, rounds: int = 3, kill: str | None = None,
        spy: Path | None = None):
    """A secure cluster of three numpy workers (deltas 0.5, 1 and 1.5); worker 2 dies as ``kill`` says."""
    env = spied(spy) if spy else {}
    ps = start_ps("--num-workers", "3", "--rounds", str(rounds), "--exit-grace", "5", "--secure-aggregation",
                  "--lease-seconds", "2", *flags, env=env)
    workers = [start_worker(ps.address, task, tmp_path / f"w{task}.jsonl", delta=DELTAS[task],
                            env={**env, "PYTHONPATH": f"{SPY}:{ROOT}", "COMIND_TEST_SECAGG_KILL": kill}
                            if kill and task == 2 else env) for task in range(3)]
    for task in (0, 1):
        assert_finishes(workers[task], ps, timeout=60)
    if kill:
        assert workers[2].wait(timeout=60) == -9
    else:
        assert_finishes(workers[2], ps, timeout=60)
    assert ps.wait() == 0
    return ps, [read_history(tmp_path / f"w{task}.jsonl") for task in range(3)]


def values(history: list[dict]) -> list[float]:
    return [entry["values"][0] for entry in history]


def test_secure_rounds_take_the_exact_mean_and_the_ps_never_holds_an_update(start_ps, tmp_path):
    """... and takes masked inputs in its receive slots, one at a time here: the others wait on their workers."""
    spy = tmp_path / "spy"
    spy.mkdir()
    ps, histories = run(start_ps, tmp_path, "--max-concurrent-updates", "1", spy=spy)
    for history in histories:  # uniform weighting: the mean of 0.5, 1 and 1.5 a round
        np.testing.assert_allclose(values(history), [0, 1, 2, 3], atol=1e-6)
    assert len(re.findall(r"Round \d/3: 3 updates", ps.log())) == 3
    assert not list(spy.glob("plain-*")), "the ps decoded or summed an update in the clear"
    encoded = [np.load(f) for f in spy.glob("encoded-*")]
    masked = [np.load(f) for f in spy.glob("masked-*")]
    assert len(encoded) == len(masked) == 9
    assert [int(np.load(f)) for f in spy.glob("receiving-*")] == [1] * 9
    from scipy.stats import chisquare
    for input in masked:
        assert not any(np.array_equal(input, e) for e in encoded)
        # An encoding of a constant update is one value repeated; its masked input looks uniform.
        assert chisquare(np.bincount(input >> 28, minlength=16)).pvalue > 1e-4


@pytest.mark.parametrize("stage, round_two", [("share", 0.75), ("masked_input", 0.75), ("unmask", 1.0)])
def test_a_worker_killed_at_a_stage_is_recovered(start_ps, tmp_path, stage, round_two):
    """Worker 2 dies in round 2 at ``stage``: the round closes with the survivors' mean (with its input too, once it
    was masked in), and round 3 with the two left."""
    ps, histories = run(start_ps, tmp_path, kill=f"{stage}:2")
    for history in histories[:2]:
        np.testing.assert_allclose(values(history), [0, 1, 1 + round_two, 1.75 + round_two], atol=1e-6)
    recovered = re.search(r"Round 2's sum of (\d) masked inputs unmasked .* (\d) dropped out and recovered", ps.log())
    # Killed before it shared keys, it masked no one's input: nothing to recover.
    expected = {"share": ("2", "0"), "masked_input": ("2", "1"), "unmask": ("3", "1")}[stage]
    assert recovered and recovered.groups() == expected


def test_a_round_with_too_few_survivors_fails_cleanly_and_starts_again(start_ps, tmp_path):
    """With every share needed (threshold 1), losing worker 2 fails round 2: the previous model stands, and the
    round starts again with the two left."""
    ps, histories = run(start_ps, tmp_path, "--secagg-threshold", "1", kill="masked_input:2")
    log = ps.log()
    assert re.search(r"Round 2's secure aggregation failed at its stage 'masked input'.*The previous model "
                     r"stands", log)
    assert "Round 2/3: 2 updates" in log
    for history in histories[:2]:
        np.testing.assert_allclose(values(history), [0, 1, 1.75, 2.5], atol=1e-6)


@pytest.mark.parametrize("flags, says", [
    (["--aggregation", "median"], "COMIND_AGGREGATION=median needs each of them"),
    (["--weighting", "examples"], "every update counts once"),
    (["--replicas-to-aggregate", "2"], "unset it"),
    (["--update-encoding", "int8"], "unset COMIND_UPDATE_ENCODING"),
    (["--secagg-neighbours", "3"], "COMIND_SECAGG_NEIGHBOURS must be an even number"),
    (["--rounds-mode", "async"], "set COMIND_ROUNDS_MODE to sync"),
])
def test_the_ps_refuses_what_secure_aggregation_cannot_do(flags, says):
    result = subprocess.run([sys.executable, "-m", "comind", "ps", "--secure-aggregation", *flags], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_comind_local_trains_the_digits_as_well_with_secure_aggregation(tmp_path):
    """The same run with and without it (the shards are equal, so weighting by examples is uniform weighting):
    the fixed-point rounding costs at most half a point of accuracy."""
    env = {**os.environ, "COMIND_METRICS_PORT": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
    runs = {name: subprocess.Popen([sys.executable, "-m", "comind", "local", "--workers", "3", "--rounds", "3",
                                    "--interval-steps", "20", "--output-dir", str(tmp_path / name), *flags],
                                   cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name, flags in (("plain", []), ("secure", ["--secure-aggregation"]))}
    accuracy = {}
    for name, run in runs.items():
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output
        accuracy[name] = json.loads((tmp_path / name / "metrics.json").read_text())["final"]["eval_accuracy"]
    assert "aggregates securely" in (tmp_path / "secure" / "logs" / "worker-1.log").read_text()
    assert accuracy["plain"] > 0.5
    assert abs(accuracy["secure"] - accuracy["plain"]) <= 0.005, accuracy


def test_hostile_calls_get_their_status_and_are_counted(start_ps):
    """Over the wire: a worker that advertises another's keys, and a plain update to a ps that aggregates
    securely, are refused with their statuses; the honest worker's call goes on."""
    port = free_port()
    ps = start_ps("--num-workers", "2", "--rounds", "2", "--secure-aggregation", "--metrics-port", str(port),
                  "--round-timeout", "30")
    arrays = [np.zeros((4, 3), np.float32)]
    with RawClient(ps.address) as client:
        honest, copycat = client.join(0), client.join(1)
        client.initialize(honest, arrays)
        keys = pb.SecAggKeys(cipher_key=bytes(range(32)), mask_key=bytes(range(1, 33)))
        waiting = threading.Event()

        def advertise():  # open until the roster: the other worker never advertises keys of its own
            yield pb.WorkerMessage(hello=pb.Hello(member_id=honest, have_round=0, update=update_header(arrays),
                                                  secagg_keys=keys))
            waiting.wait(30)

        call = client.stub.Round(advertise(), timeout=30)
        ps.wait_for(r"Worker 0 joined")
        deadline = time.monotonic() + 10
        while not Scrape(port)("comind_secagg_bytes_total", stage="advertise") and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as copied:
            client.call([pb.WorkerMessage(hello=pb.Hello(member_id=copycat, have_round=0,
                                                         update=update_header(arrays), secagg_keys=keys))])
        assert copied.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "already advertised" in copied.value.details()
        with pytest.raises(grpc.RpcError) as plain:
            client.send(copycat, arrays)
        assert plain.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "aggregates securely" in plain.value.details()
        metrics = Scrape(port)
        assert metrics("comind_secagg_refusals_total", reason="key_advertised_twice") == 1
        waiting.set()
        call.cancel()


def test_client_sampling_makes_the_selected_workers_a_rounds_parties(start_ps, tmp_path):
    deltas = [0.5, 1.0, 1.5, 2.0]
    ps = start_ps("--num-workers", "4", "--rounds", "3", "--exit-grace", "5", "--secure-aggregation",
                  "--clients-per-round", "3")
    workers = [start_worker(ps.address, task, tmp_path / f"w{task}.jsonl", delta=deltas[task]) for task in range(4)]
    for worker in workers:
        assert_finishes(worker, ps, timeout=60)
    assert ps.wait() == 0
    selected = [{int(t) for t in re.findall(r"\d+", re.sub(r"(\d+)\.\.(\d+)", lambda m: ",".join(
        map(str, range(int(m[1]), int(m[2]) + 1))), tasks))}
        for tasks in re.findall(r"Round \d selects .*: tasks ([\d.,]+)\.", ps.log())]
    assert [len(s) for s in selected] == [3, 3, 3]
    expected = np.cumsum([0] + [np.mean([deltas[t] for t in s]) for s in selected])
    for task in range(4):  # a worker not selected waits: its history skips that round's model
        history = read_history(tmp_path / f"w{task}.jsonl")
        np.testing.assert_allclose(values(history), [expected[entry["round"]] for entry in history], atol=1e-6)


def test_a_ps_restarted_mid_round_starts_the_round_again(start_ps, tmp_path):
    """The ps dies while round 3 waits at its unmask stage for worker 2: the restarted ps resumes from round 2's
    checkpoint, and round 3 runs again from its first stage, with new keys, to the same mean."""
    flags = ["--num-workers", "3", "--rounds", "4", "--exit-grace", "5", "--secure-aggregation",
             "--checkpoint-dir", str(tmp_path / "checkpoints")]
    first = start_ps(*flags)
    workers = [start_worker(first.address, task, tmp_path / f"w{task}.jsonl", delta=DELTAS[task],
                            env={"PYTHONPATH": f"{SPY}:{ROOT}", "COMIND_TEST_SECAGG_PAUSE": "unmask:3:6"}
                            if task == 2 else None) for task in range(3)]
    first.wait_for(r"Round 2/4")
    time.sleep(2)
    first.kill()
    assert "Round 3/4" not in first.log()
    second = start_ps(*flags, port=first.port)
    assert second.wait_for(r"Resumed from \S+ at round (\d+)").group(1) == "2"
    for worker in workers:
        assert_finishes(worker, second, timeout=90)
    assert second.wait(timeout=60) == 0
    assert "Round 3/4: 3 updates" in second.log()
    for task in range(3):
        np.testing.assert_allclose(values(read_history(tmp_path / f"w{task}.jsonl"))[-1], 4.0, atol=1e-6)


def test_federated_evaluation_reports_travel_with_the_masked_inputs_headers(start_ps):
    """Each worker's test of round 0's model goes up in its round-1 hello, beside its keys: round 1's model
    comes down with the three reports, the ps having taken those of the updates its sum holds."""
    from concurrent.futures import ThreadPoolExecutor

    from comind import WorkerClient, federated_eval

    ps = start_ps("--num-workers", "3", "--rounds", "1", "--exit-grace", "5", "--secure-aggregation",
                  "--federated-eval-every", "1")
    reports = {task: federated_eval.Report(0, 1.0 + task, 0.5 + task / 10, 10 * (task + 1)) for task in range(3)}

    def worker(task: int) -> federated_eval.Evaluation | None:
        client = WorkerClient(ps.address, task_index=task)
        try:
            state = client.join([np.zeros(4, np.float32)])
            return client.sync([w + DELTAS[task] for w in state.weights], num_examples=5,
                               evaluation=reports[task]).federated_eval
        finally:
            client.close()

    with ThreadPoolExecutor(3) as pool:
        evaluations = list(pool.map(worker, range(3)))
    assert evaluations == [federated_eval.Evaluation(0, reports)] * 3
    assert ps.wait(timeout=60) == 0
    assert "Round 1/1: 3 updates" in ps.log()
