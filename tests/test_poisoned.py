"""One poisoned worker of four, against a real ps and real worker processes on the embedded digits.

Issue 8: with the plain mean, a worker that sends its weights times 100, or
random weights, derails training; with the coordinate-wise median, the
trimmed mean, or a bound on each update's change, the accuracy stays within
a few points of the clean run. The workers are NumPy softmax regressions
(tests/digits_worker.py), so that nine clusters train in seconds; each
test prints the accuracies it compares. Last, in process, the ps clipping
an update and counting it in comind_updates_clipped_total.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from comind.metrics import PsMetrics
from comind.proto import comind_pb2 as pb
from comind.ps import ParameterServer
from comind.robust import AggregationPolicy
from comind.rounds import RoundPolicy
from comind.tensors import Layout
from conftest import ROOT, PsProcess

WORKERS, ROUNDS = 4, 20
POISONED_TASK = WORKERS - 1  # not the chief, which provides the initial model and reports the accuracy
#: Honest updates change the model by a norm of 2.4 in the first round, falling to 0.4 by the last (the ps logs
#: each at debug level): 3 clips none of them.
MAX_UPDATE_NORM = "3"
DEFENCES = {
    "median": ["--aggregation", "median"],
    "trimmed-mean": ["--aggregation", "trimmed-mean", "--trim-fraction", "0.25"],
    "norm bound": ["--max-update-norm", MAX_UPDATE_NORM],
}
#: How close to the clean run a defended one must end, and how far below it the undefended one.
TOLERANCE, DERAILED = 0.05, 0.20


def train(start_ps, tmp_path, ps_flags: list[str], poison: str | None = None) -> tuple[float, PsProcess]:
    """Trains WORKERS workers, task POISONED_TASK poisoned if asked; returns the final accuracy and the ps."""
    ps = start_ps("--num-workers", str(WORKERS), "--rounds", str(ROUNDS), "--exit-grace", "10", *ps_flags)
    out = tmp_path / "accuracy.json"
    workers = []
    for task in range(WORKERS):
        args = [sys.executable, ROOT / "tests" / "digits_worker.py", ps.address, str(task),
                "--num-workers", str(WORKERS)]
        if task == 0:
            args += ["--out", str(out)]
        if task == POISONED_TASK and poison:
            args += ["--poison", poison]
        workers.append(subprocess.Popen(args, env=os.environ, stderr=subprocess.PIPE, text=True))
    for worker in workers:
        assert worker.wait(timeout=60) == 0, worker.stderr.read() + "\nps log:\n" + ps.log()
    assert ps.wait() == 0, ps.log()
    report = json.loads(out.read_text())
    assert report["round"] == ROUNDS
    return report["accuracy"], ps


@pytest.fixture(scope="module")
def clean_accuracy(tmp_path_factory) -> float:
    """The baseline: the same cluster with no poisoned worker and the plain mean (module-wide, as it is slow)."""
    started: list[PsProcess] = []

    def start(*args: str) -> PsProcess:
        started.append(PsProcess(list(args)))
        return started[-1]

    try:
        return train(start, tmp_path_factory.mktemp("clean"), [])[0]
    finally:
        for ps in started:
            ps.stop()


def report(capsys, line: str) -> None:
    with capsys.disabled():
        print(f"\n  {line}", end="")


@pytest.mark.parametrize("poison", ["scaled", "random"])
def test_the_plain_mean_is_derailed_by_one_poisoned_worker(start_ps, tmp_path, capsys, clean_accuracy, poison):
    accuracy, _ = train(start_ps, tmp_path, [], poison)
    report(capsys, f"mean, {poison} poison: accuracy {accuracy:.3f} (clean mean: {clean_accuracy:.3f})")
    assert clean_accuracy >= 0.90
    assert accuracy <= clean_accuracy - DERAILED


@pytest.mark.parametrize("defence", DEFENCES)
@pytest.mark.parametrize("poison", ["scaled", "random"])
def test_each_defence_keeps_the_accuracy_of_the_clean_run(start_ps, tmp_path, capsys, clean_accuracy, poison,
                                                          defence):
    accuracy, ps = train(start_ps, tmp_path, DEFENCES[defence], poison)
    report(capsys, f"{defence}, {poison} poison: accuracy {accuracy:.3f} (clean mean: {clean_accuracy:.3f})")
    assert accuracy >= clean_accuracy - TOLERANCE
    if defence == "norm bound":  # the attacker's every update, and no honest one
        clipped = [int(task) for task in re.findall(r"Clipped worker (\d+)'s update", ps.log())]
        assert clipped == [POISONED_TASK] * ROUNDS


def test_the_ps_clips_each_update_it_folds_in_and_counts_those_it_clipped():
    registry = CollectorRegistry()
    ps = ParameterServer(RoundPolicy(num_workers=2, total_rounds=1), PsMetrics(registry),
                         aggregation=AggregationPolicy(max_update_norm=1.0))
    start = [np.zeros(4, np.float32)]
    layout = Layout.of(start)

    async def train() -> np.ndarray:
        members = [ps.register(task, "").member_id for task in range(2)]
        await ps.initialize(layout, layout.pack(start))
        for member, update in zip(members, ([0.5, 0, 0, 0], [0, 30, 0, 40]), strict=True):  # norms 0.5 and 50
            header = pb.UpdateHeader(member_id=member, round=1, num_examples=1, tensors=layout.to_proto())
            await ps.commit_update(ps.open_update(header), layout.pack([np.float32(update)]))
        await ps.maybe_close()
        return layout.views(ps.model.packed)[0]

    model = asyncio.run(train())
    np.testing.assert_allclose(model, [0.25, 0.3, 0, 0.4], rtol=1e-6)  # the mean of [.5,0,0,0] and [0,.6,0,.8]
    assert registry.get_sample_value("comind_updates_clipped_total") == 1


def test_a_round_whose_average_overflows_keeps_the_previous_model(caplog):
    ps = ParameterServer(RoundPolicy(num_workers=2, total_rounds=2), PsMetrics(CollectorRegistry()))
    start = [np.ones(4, np.float32)]
    layout = Layout.of(start)
    near_the_limit = np.float32(3e38)  # finite, but two of them overflow a float32 sum

    async def train() -> list[np.ndarray]:
        members = [ps.register(task, "").member_id for task in range(2)]
        await ps.initialize(layout, layout.pack(start))
        models = []
        for round, value in ((1, near_the_limit), (2, np.float32(5))):
            for member in members:
                header = pb.UpdateHeader(member_id=member, round=round, num_examples=1, tensors=layout.to_proto())
                await ps.commit_update(ps.open_update(header), layout.pack([np.full(4, value)]))
            await ps.maybe_close()
            models.append(layout.views(ps.model.packed)[0].copy())
        return models

    overflowed, next_round = asyncio.run(train())
    np.testing.assert_array_equal(overflowed, start[0])  # round 1 kept round 0's model
    np.testing.assert_array_equal(next_round, [5, 5, 5, 5])  # and training went on
    assert ps.rounds.round == 2
    assert "Round 1's average is not finite" in caplog.text
