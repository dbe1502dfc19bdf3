"""Federated evaluation: each worker's test of the global model on its held-out examples, and the ps's summary.

End to end, a real ps and real Keras workers on Dirichlet shards: two `comind worker` processes (the
``model.fit`` callback) and one custom loop (``examples/custom_loop.py``, the wrapper). The test computes what
each worker should have measured itself, from the ps's checkpoint of the model tested and the worker's held-out
examples, and compares the ps's metrics, the chief's metrics.json and its TensorBoard events with it. Bad reports
go to a ps over the raw protocol.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from comind import datasets, federated_eval, refusals, sharding
from comind.proto import comind_pb2 as pb
from events import tensorboard_scalars
from processes import ROOT, PsProcess
from raw_protocol import RawClient, update_messages
from scrape import Scrape, free_port

ENV = {**os.environ, "COMIND_METRICS_PORT": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}


# The summary -----------------------------------------------------------------

def test_the_distribution_is_min_median_max_over_workers_and_the_mean_over_their_examples():
    evaluation = federated_eval.Evaluation(4, {
        0: federated_eval.Report(4, 0.5, 0.9, 10), 1: federated_eval.Report(4, 2.0, 0.3, 30),
        5: federated_eval.Report(4, 1.0, 0.6, 60)})
    accuracy = evaluation.distribution("accuracy")
    assert (accuracy.min, accuracy.median, accuracy.max) == (0.3, 0.6, 0.9)
    assert accuracy.mean == pytest.approx((10 * 0.9 + 30 * 0.3 + 60 * 0.6) / 100)  # 0.54: the examples' own
    assert evaluation.distribution("loss") == federated_eval.Distribution(0.5, 1.0, 2.0, pytest.approx(1.25))
    summary = evaluation.to_json()
    assert (summary["round"], summary["num_workers"], summary["num_examples"]) == (4, 3, 100)
    assert summary["workers"]["5"] == {"loss": 1.0, "accuracy": 0.6, "num_examples": 60}


@pytest.mark.parametrize(("every", "report", "refusal", "words"), [
    (0, federated_eval.Report(0, 1.0, 0.5, 10), refusals.InvalidRequest, "asks for none"),
    (2, federated_eval.Report(1, 1.0, 0.5, 10), refusals.InvalidRequest, "multiples of 2"),
    (1, federated_eval.Report(0, math.inf, 0.5, 10), refusals.NotFinite, "finite"),
    (1, federated_eval.Report(0, 1.0, -0.1, 10), refusals.OutOfRange, "accuracy=-0.1"),
    (1, federated_eval.Report(0, 1.0, 0.5, 101), refusals.OutOfRange, "1 to 100 examples"),
])
def test_a_report_the_ps_did_not_ask_for_or_out_of_range_is_refused(every, report, refusal, words):
    collector = federated_eval.Collector(every, max_examples=100)
    with pytest.raises(refusal, match=words):
        collector.check(report, update_round=report.round + 1)
    collector.check(None, update_round=1)  # an update without a report is no error


def test_a_held_out_split_is_seeded_per_worker_and_leaves_examples_to_train_on():
    shard = np.arange(100, 150)
    train, held_out = sharding.hold_out(shard, 0.1, seed=3, index=1)
    assert len(held_out) == 5 and len(train) == 45
    assert sorted([*train, *held_out]) == list(shard)
    assert np.array_equal(held_out, sharding.hold_out(shard, 0.1, seed=3, index=1)[1])
    assert not np.array_equal(held_out, sharding.hold_out(shard, 0.1, seed=3, index=2)[1])
    assert [len(part) for part in sharding.hold_out(np.arange(2), 0.9)] == [1, 1]
    with pytest.raises(ValueError, match="two examples at least"):
        sharding.hold_out(np.arange(1), 0.5)


# Bad reports, over the raw protocol -------------------------------------------------------------

INITIAL = [np.zeros((4, 3), np.float32)]
DELTA = [np.full((4, 3), 0.25, np.float32)]


def with_report(member: str, report: pb.FederatedEvalReport, round: int = 1) -> list[pb.WorkerMessage]:
    messages = update_messages(member, DELTA, round)
    messages[0].hello.update.federated_eval.CopyFrom(report)
    return messages


GOOD = pb.FederatedEvalReport(round=0, loss=1.5, accuracy=0.75, num_examples=20)
BAD_REPORTS = {
    "NaN accuracy": (pb.FederatedEvalReport(round=0, loss=1.0, accuracy=math.nan, num_examples=5),
                     grpc.StatusCode.OUT_OF_RANGE, "must be finite"),
    "accuracy past 1": (pb.FederatedEvalReport(round=0, loss=1.0, accuracy=1.5, num_examples=5),
                        grpc.StatusCode.OUT_OF_RANGE, "accuracy=1.5"),
    "negative loss": (pb.FederatedEvalReport(round=0, loss=-1.0, accuracy=0.5, num_examples=5),
                      grpc.StatusCode.OUT_OF_RANGE, "loss=-1.0"),
    "no examples": (pb.FederatedEvalReport(round=0, loss=1.0, accuracy=0.5), grpc.StatusCode.OUT_OF_RANGE,
                    "num_examples=0"),
    "another round's model": (pb.FederatedEvalReport(round=7, loss=1.0, accuracy=0.5, num_examples=5),
                              grpc.StatusCode.INVALID_ARGUMENT, "round 0 here"),
}


def test_bad_reports_are_refused_with_their_status_and_counted_and_a_good_one_is_taken_once():
    port = free_port()
    ps = PsProcess(["--num-workers", "2", "--rounds", "3", "--federated-eval-every", "1", "--lease-seconds", "300",
                    "--metrics-port", str(port)])
    try:
        with RawClient(ps.address) as client:
            a, b = client.join(0), client.join(1)
            client.initialize(a, INITIAL)
            for case, (report, code, words) in BAD_REPORTS.items():
                with pytest.raises(grpc.RpcError) as refused:
                    client.call(with_report(a, report))
                assert (refused.value.code(), words in refused.value.details()) == (code, True), case
            metrics = Scrape(port)
            assert metrics("comind_federated_eval_reports_total", result="rejected") == len(BAD_REPORTS)
            assert metrics.updates()["rejected"] == len(BAD_REPORTS)  # the update that carried it, too
            assert metrics("comind_round") == 0 and math.isnan(metrics("comind_federated_eval_round"))

            assert client.send(a, DELTA).receipt.result == pb.UPDATE_RESULT_ACCEPTED  # an update needs no report
            # a's update for round 1 is in; again with a report, it changes nothing (once per worker and round).
            assert client.call(with_report(a, GOOD), wait_for_model=False).receipt.result == \
                pb.UPDATE_RESULT_DUPLICATE
            assert client.call(with_report(b, GOOD)).header.round == 1
            reply = client.model(a)
            metrics = Scrape(port)
    finally:
        ps.stop()
    assert metrics("comind_federated_eval_reports_total", result="accepted") == 1
    assert (metrics("comind_federated_eval_round"), metrics("comind_federated_eval_workers"),
            metrics("comind_federated_eval_examples")) == (0, 1, 20)
    for statistic in federated_eval.STATISTICS:
        assert metrics("comind_federated_eval_accuracy", statistic=statistic) == 0.75
        assert metrics("comind_federated_eval_loss", statistic=statistic) == 1.5
    assert reply.header.federated_eval == pb.FederatedEvalResult(round=0, workers={1: GOOD})
    assert reply.header.server_learning_rate == 1.0


# End to end -----------------------------------------------------------------------------------------

WORKERS, ROUNDS, EVERY, ALPHA, SERVER_LR = 3, 4, 2, 0.5, 0.5
SHARD = ["--num-workers", str(WORKERS), "--shard", "dirichlet", "--dirichlet-alpha", str(ALPHA),
         "--interval-steps", "10"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A finished run: the chief's output folder, the ps's checkpoints, and a scrape of the ps at its end."""
    root = tmp_path_factory.mktemp("federated-eval")
    port = free_port()
    ps = PsProcess(["--num-workers", str(WORKERS), "--replicas-to-aggregate", str(WORKERS), "--rounds",
                    str(ROUNDS), "--federated-eval-every", str(EVERY), "--server-learning-rate", str(SERVER_LR),
                    "--checkpoint-dir", str(root / "checkpoints"), "--keep-checkpoints", "10",
                    "--exit-grace", "300", "--metrics-port", str(port)])
    logs = [root / f"worker-{task}.log" for task in range(WORKERS)]
    commands = [[sys.executable, "-m", "comind", "worker", "--ps-address", ps.address, "--task-index", str(task),
                 *SHARD, "--output-dir", str(root / "output"), "--eval-every", "1"] for task in range(WORKERS - 1)]
    commands.append([sys.executable, str(ROOT / "examples" / "custom_loop.py"), "--ps-address", ps.address,
                     "--task-index", str(WORKERS - 1), *SHARD])
    workers = [subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT)
               for command, log in zip(commands, logs, strict=True)]
    try:
        # A member that stays once the workers leave keeps the ps serving, so that its metrics can be read at the
        # end: rounds close at the workers' updates (--replicas-to-aggregate) without it.
        with RawClient(ps.address) as client:
            member = client.join(WORKERS)
            deadline = time.monotonic() + 240
            while any(worker.poll() is None for worker in workers) and time.monotonic() < deadline:
                client.heartbeat(member)
                time.sleep(1)
            for worker, log in zip(workers, logs, strict=True):
                assert worker.poll() == 0, log.read_text() + ps.log()
            metrics = Scrape(port)
    finally:
        for worker in workers:
            worker.kill()
        ps.stop()
    return root, metrics, ps.log()


def measured(round: int, root) -> dict[int, tuple[float, float, int]]:
    """What each worker should have measured of the global model of ``round``: its loss (Keras's cross-entropy,
    written out here), accuracy and held-out examples, by task index, from the ps's checkpoint of the model."""
    import keras

    from comind import models
    from comind.worker import prepare

    data = datasets.load("digits")
    model = models.basic(data.input_shape, data.num_classes)
    with np.load(root / "checkpoints" / f"round-{round:09d}.npz") as saved:
        model.set_weights([saved[f"tensor_{i:05d}"] for i in range(len(saved["names"]))])
    figures = {}
    for task in range(WORKERS):
        shard = sharding.shard(data.y_train, WORKERS, task, "dirichlet", ALPHA, seed=0)
        _, held_out = sharding.hold_out(shard, 0.1, seed=0, index=task)
        probabilities = np.asarray(model(prepare(data.x_train[held_out]), training=False), np.float64)
        labels = data.y_train[held_out]
        picked = np.clip(probabilities[np.arange(len(labels)), labels], keras.config.epsilon(),
                         1 - keras.config.epsilon())
        figures[task] = (float(np.mean(-np.log(picked))), float(np.mean(probabilities.argmax(-1) == labels)),
                         len(labels))
    return figures


def expected_distribution(figures: dict[int, tuple[float, float, int]], which: int) -> list[float]:
    values = np.array([f[which] for f in figures.values()])
    weights = [f[2] for f in figures.values()]
    return [np.min(values), np.median(values), np.max(values), np.average(values, weights=weights)]


def test_the_ps_exports_what_the_workers_measured_on_their_held_out_examples(federation):
    root, metrics, log = federation
    records = {r["round"]: r for r in json.loads((root / "output" / "metrics.json").read_text())["rounds"]}
    # Round R + 1's updates bring in the tests of round R's model: 0 and 2 (the final model is tested by the chief).
    evaluations = {r["federated_eval"]["round"]: r["federated_eval"] for r in records.values() if r["federated_eval"]}
    assert sorted(evaluations) == [0, 2] and records[1]["federated_eval"]["round"] == 0
    for round, evaluation in evaluations.items():
        figures = measured(round, root)
        assert evaluation["num_workers"] == WORKERS
        assert evaluation["num_examples"] == sum(f[2] for f in figures.values())
        for task, (loss, accuracy, examples) in figures.items():
            worker = evaluation["workers"][str(task)]
            assert (worker["accuracy"], worker["num_examples"]) == (accuracy, examples), (round, task)
            assert worker["loss"] == pytest.approx(loss, rel=1e-5), (round, task)
        for which, figure in ((0, "loss"), (1, "accuracy")):
            expected = expected_distribution(figures, which)
            assert [evaluation[figure][s] for s in federated_eval.STATISTICS] == pytest.approx(expected, rel=1e-5)
    # The ps's gauges hold the last evaluation, as metrics.json has it.
    last = evaluations[2]
    assert (metrics("comind_federated_eval_round"), metrics("comind_federated_eval_workers"),
            metrics("comind_federated_eval_examples")) == (2, WORKERS, last["num_examples"])
    for figure in ("accuracy", "loss"):
        assert {s: metrics(f"comind_federated_eval_{figure}", statistic=s) for s in federated_eval.STATISTICS} == \
            last[figure]
    assert metrics("comind_federated_eval_reports_total", result="accepted") == 2 * WORKERS
    assert metrics("comind_federated_eval_reports_total", result="rejected") == 0
    assert "Round 2 federated evaluation: 3 workers" in log
    # On Dirichlet shards the model serves the workers differently: the spread is what the figures are for.
    assert last["accuracy"]["min"] < last["accuracy"]["max"]


def test_tensorboard_has_the_server_learning_rate_and_the_federated_figures(federation):
    root, _, _ = federation
    records = json.loads((root / "output" / "metrics.json").read_text())["rounds"]
    assert [r["server_learning_rate"] for r in records] == [SERVER_LR] * ROUNDS
    scalars = tensorboard_scalars(root / "output" / "tensorboard")
    assert scalars["server/learning_rate"] == {round: SERVER_LR for round in range(1, ROUNDS + 1)}
    for record in records:
        evaluation = record["federated_eval"]
        for figure in ("accuracy", "loss") if evaluation else ():
            for statistic in federated_eval.STATISTICS:
                assert scalars[f"federated/{figure}_{statistic}"][evaluation["round"]] == \
                    np.float32(evaluation[figure][statistic])
    assert sorted(scalars["federated/accuracy_mean"]) == [0, 2]


def test_the_custom_loop_wrapper_reports_in_distributed_mode_and_a_worker_without_held_out_data_is_told(start_ps):
    import keras
    import tensorflow as tf

    import comind
    from comind import models
    from comind.worker import prepare

    ps = start_ps("--num-workers", "1", "--rounds", "3", "--mode", "distributed", "--federated-eval-every", "2",
                  "--exit-grace", "5")
    data = datasets.load("digits")
    x, y = prepare(data.x_train[:84]), data.y_train[:84]
    held_out = x[64:], y[64:]
    model = models.basic(data.input_shape, data.num_classes)
    cross_entropy = keras.losses.SparseCategoricalCrossentropy()
    with comind.WorkerClient(ps.address, task_index=0) as client, pytest.raises(ValueError, match="eval_data=None"):
        comind.FederatedAveragingOptimizer(keras.optimizers.Adam(), model, client).start()
    models_held: dict[int, list[np.ndarray]] = {}
    states: list[comind.GlobalState] = []

    def on_round(state: comind.GlobalState) -> None:
        states.append(state)
        models_held[state.round] = [w.copy() for w in state.weights]

    with comind.WorkerClient(ps.address, task_index=0) as client:
        optimizer = comind.FederatedAveragingOptimizer(keras.optimizers.Adam(), model, client, on_round=on_round,
                                                       eval_data=held_out, eval_loss=cross_entropy)
        optimizer.start()
        for step in range(3):
            batch = slice(32 * (step % 2), 32 * (step % 2) + 32)
            with tf.GradientTape() as tape:
                loss = cross_entropy(y[batch], model(x[batch], training=True))
            optimizer.apply(tape.gradient(loss, model.trainable_variables), num_examples=32, loss=float(loss))
        assert optimizer.done
    assert ps.wait() == 0
    evaluations = {s.round: s.federated_eval for s in states if s.federated_eval}
    assert {round: e.round for round, e in evaluations.items()} == {1: 0, 3: 2}
    for evaluation in evaluations.values():
        model.set_weights(models_held[evaluation.round])
        probabilities = np.asarray(model(held_out[0], training=False), np.float64)
        picked = probabilities[np.arange(20), held_out[1]]
        report = evaluation.workers[0]
        assert (report.accuracy, report.num_examples) == (np.mean(probabilities.argmax(-1) == held_out[1]), 20)
        assert report.loss == pytest.approx(np.mean(-np.log(picked)), rel=1e-5)
