"""Distributed mode against one process on the same steps: the same curves, and what a round costs beyond its step.

For each seed, on the embedded digits with the basic model:

* ``comind local --mode distributed --workers 2``: every round is one step of
  batch 32 on each worker, whose gradients the ps averages and its Adam
  applies at the original's learning rate, sqrt(2) x 0.001; the chief tests
  the global model every 10 rounds;
* ``comind train --batch-size 64 --learning-rate 0.0014142``: one process on
  the combined batch at that learning rate, tested after every epoch (23
  steps).

Both start from the same initial weights (``--seed``) and take the same
number of steps; only the order of the examples differs (each worker
shuffles its own half, the one process all of them), so their test curves
should lie on each other up to that. tests/test_distributed.py checks the
equivalence exactly, on the same batches.

The round overhead is read from the logs as bench/flower.py reads them: a
round is the time between two global models (the ps's log), its step the
slowest worker's local training in it (each worker's debug line "Round N: 1
local steps in S s"); the overhead is the rest (sending the gradients,
averaging, the ps's Adam, sending the model back, waiting for the other
worker). Means over rounds 2 to the last (the log's timestamps are in
milliseconds: the mean of many rounds is finer than one round's).

    .venv/bin/python bench/distributed.py [--seeds 0 1] [--steps 1500]

Writes its output to bench/results/distributed.txt and the curves to
bench/results/distributed.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from matplotlib.figure import Figure

from training import THROUGHPUT, run
from vs_flower.comind_side import CLOSED, TRAINED

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORKERS, BATCH_SIZE, EVAL_EVERY = 2, 32, 10
LEARNING_RATE = math.sqrt(WORKERS) * 1e-3
STEPS_PER_EPOCH = 23  # of one process: ceil(1,437 / 64)


def curve(output: Path, steps_per_record: int, steps: int) -> tuple[list[int], list[float], list[float]]:
    """The steps after which the model was tested, and its test loss and accuracy there."""
    records = [r for r in json.loads((output / "metrics.json").read_text())["rounds"] if r["eval_accuracy"] is not None]
    return ([min(r["round"] * steps_per_record, steps) for r in records], [r["eval_loss"] for r in records],
            [r["eval_accuracy"] for r in records])


def distributed(steps: int, seed: int, output: Path) -> dict:
    run(["local", "--mode", "distributed", "--workers", str(WORKERS), "--batch-size", str(BATCH_SIZE),
         "--rounds", str(steps), "--eval-every", str(EVAL_EVERY), "--seed", str(seed), "--log-level", "debug"],
        output)
    logs = output / "logs"
    closed = {int(r): _timestamp(stamp) for stamp, r in CLOSED.findall((logs / "ps.log").read_text())}
    step: dict[int, float] = {}
    for log in logs.glob("worker-*.log"):
        for r, seconds in TRAINED.findall(log.read_text()):
            step[int(r)] = max(step.get(int(r), 0.0), float(seconds))
    if sorted(closed) != list(range(1, steps + 1)) or sorted(step) != sorted(closed):
        raise RuntimeError(f"expected a round line and a step line for each of rounds 1 to {steps} in {logs}")
    later = range(2, steps + 1)  # round 1 waits for the workers' start
    round_seconds = (closed[steps] - closed[1]) / (steps - 1)
    step_seconds = statistics.fmean(step[r] for r in later)
    return {"curve": curve(output, 1, steps), "round": round_seconds, "step": step_seconds,
            "overhead": round_seconds - step_seconds}


def one_process(steps: int, seed: int, output: Path) -> dict:
    run(["train", "--batch-size", str(WORKERS * BATCH_SIZE), "--learning-rate", f"{LEARNING_RATE:.7f}",
         "--steps", str(steps), "--seed", str(seed)], output)
    trained = THROUGHPUT.findall((output / "stderr.log").read_text())
    if not trained:
        raise RuntimeError(f"no throughput line in {output / 'stderr.log'}")
    return {"curve": curve(output, STEPS_PER_EPOCH, steps), "step": float(trained[-1][1]) / steps}


def _timestamp(stamp: str) -> float:
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def table(results: dict[str, list[dict]], seeds: list[int]) -> list[str]:
    lines = [f"{'seed':<6}{'final test accuracy':>22}{'final test loss':>20}"
             f"{'largest accuracy gap at a common step':>40}",
             f"{'':<6}{'distributed / one':>22}{'distributed / one':>20}"]
    for index, seed in enumerate(seeds):
        ours, theirs = results["distributed"][index]["curve"], results["one process"][index]["curve"]
        common = sorted(set(ours[0]) & set(theirs[0]))
        gap = max(abs(ours[2][ours[0].index(s)] - theirs[2][theirs[0].index(s)]) for s in common)
        lines.append(f"{seed:<6}{f'{ours[2][-1]:.4f} / {theirs[2][-1]:.4f}':>22}"
                     f"{f'{ours[1][-1]:.4f} / {theirs[1][-1]:.4f}':>20}"
                     f"{f'{gap:.4f} ({len(common)} steps compared)':>40}")
    d, o = results["distributed"], results["one process"]

    def milliseconds(runs: list[dict], what: str) -> str:
        return f"{1e3 * statistics.median(r[what] for r in runs):7.2f}"

    lines += ["", "time per step (ms, median over the seeds):",
              f"  distributed, one round:                        {milliseconds(d, 'round')}",
              f"    of which the slowest worker's step:          {milliseconds(d, 'step')}",
              f"    round overhead (the rest):                   {milliseconds(d, 'overhead')}",
              f"  one process, one step of the combined batch:   {milliseconds(o, 'step')}"]
    return lines


def plot(results: dict[str, list[dict]], seeds: list[int], path: Path) -> None:
    figure = Figure(figsize=(11, 4), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    styles = {"distributed": {"linestyle": "-"}, "one process": {"linestyle": "--", "marker": "."}}
    for index, seed in enumerate(seeds):
        for kind, style in styles.items():
            steps, losses, accuracies = results[kind][index]["curve"]
            name = ("comind local --mode distributed --workers 2" if kind == "distributed"
                    else "comind train, batch 64, lr sqrt(2) x 0.001")
            for axes, values in ((loss_axes, losses), (accuracy_axes, accuracies)):
                axes.plot(steps, values, color=f"C{index}", linewidth=1, markersize=3, **style,
                          label=f"seed {seed}: {name}")
    loss_axes.set_ylabel("test loss")
    accuracy_axes.set_ylabel("test accuracy")
    accuracy_axes.set_ylim(0.5, 1)
    for axes in (loss_axes, accuracy_axes):
        axes.set_xlabel("step (64 examples: 2 workers x 32, or one batch of 64)")
        axes.grid(alpha=0.3)
    accuracy_axes.legend(loc="lower right", fontsize="small")
    figure.suptitle("Distributed mode and one process on the combined batch, from the same initial weights")
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=1500, help="steps of each run (the digits' preset)")
    args = parser.parse_args()
    header = [f"bench/distributed.py, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
              f"load {os.getloadavg()[0]:.1f} at the start, Python {platform.python_version()}",
              f"basic model, embedded digits, {args.steps} steps of 64 examples, Adam at sqrt(2) x 0.001; "
              f"distributed: {WORKERS} workers x {BATCH_SIZE} on contiguous halves, tested every {EVAL_EVERY} "
              f"rounds; one process: batch 64, tested every epoch ({STEPS_PER_EPOCH} steps)", ""]
    results: dict[str, list[dict]] = {"distributed": [], "one process": []}
    measure = {"distributed": distributed, "one process": one_process}
    with tempfile.TemporaryDirectory() as workdir:
        for seed in args.seeds:
            for kind in results:
                output = Path(workdir) / f"{seed}-{kind.replace(' ', '-')}"
                results[kind].append(measure[kind](args.steps, seed, output))
                print(f"[{time.strftime('%H:%M:%S')}] seed {seed}, {kind}: final test accuracy "
                      f"{results[kind][-1]['curve'][2][-1]:.4f}", flush=True)
    text = "\n".join([*header, *table(results, args.seeds)]) + "\n" + NOTES
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed.txt").write_text(text)
    plot(results, args.seeds, RESULTS / "distributed.png")


NOTES = """
Largest accuracy gap: over the steps where both were tested (every 230 steps: each 10th epoch of one process,
each 23rd evaluation of distributed mode). One test image is 0.0028. Round: the time between consecutive
global models on the ps's clock, rounds 2 to the last; the slowest worker's step: its model.fit step with the
gradients' hand-over to the callback; one process: its training time (tests included) over its steps.
"""


if __name__ == "__main__":
    main()
