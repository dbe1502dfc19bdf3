"""Server optimizers and FedProx on non-IID shards: rounds to 0.90 test accuracy, and accuracy after 30 rounds.

4 workers (``comind local --workers 4``) train the basic model on
Dirichlet(0.1) shards of the embedded digits (``--shard dirichlet
--dirichlet-alpha 0.1``: most classes almost entirely on one worker), with
``--interval-steps 20`` local steps per round: a shard is about 360
examples, 11 batches of 32, so a round is about two local epochs (McMahan et
al. use 1 to 20), enough for each worker to drift towards its own classes:
with IID shares (``--shard iid``) FedAvg passes 0.90 at round 5 (seed 0),
here at round 49. Fewer steps make the rounds cheaper but less different
from distributed training; more make every algorithm's round a worker's
overfit. The chief tests the global model on
the 360 test images after every round (``--eval-every 1``).

Each algorithm runs with the same seeds (``--seed`` sets the split, the
initial weights and the data order), with the defaults of
/work/shared/ALGORITHMS.md (Reddi et al. 2021):

* FedAvg: eta 1; FedAvgM: eta 1, momentum 0.9;
* FedAdam: eta 0.1, FedYogi: eta 0.01, FedAdagrad: eta 0.1 (b1 0.9, b2 0.99,
  tau 1e-3);
* FedProx: FedAvg with ``--proximal-mu`` 0.01, 0.1 and 1 on the workers.
  Adam at 1e-3 moves a weight by about 1e-3 a step at most, 0.02 in a
  round, so the proximal gradient ``mu (w - x)`` is small next to the
  loss's unless mu is large.

None of these defaults diverged here, so no learning rate was tuned.

    .venv/bin/python bench/non_iid.py [--seeds 0 1 2] [--rounds 60]

Prints, per algorithm, the median over the seeds of the rounds to reach 0.90
(a seed that never did counts as never; the median is "never" when most
never did) and of the test accuracy after round 30, with each seed's figures;
writes the table to bench/results/non_iid.txt and the accuracy curves to
bench/results/non_iid.png. 24 runs, each 45 to 230 s on 2 busy cores
(33 minutes in all).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from matplotlib.figure import Figure

from training import run

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORKERS, ALPHA, INTERVAL_STEPS = 4, 0.1, 20
TARGET_ACCURACY, REPORTED_ROUND = 0.90, 30
#: Name: the flags that select it (the ps's server optimizer, or the workers' FedProx).
ALGORITHMS = {
    "FedAvg": [],
    "FedAvgM": ["--server-optimizer", "fedavgm"],
    "FedAdam": ["--server-optimizer", "fedadam"],
    "FedYogi": ["--server-optimizer", "fedyogi"],
    "FedAdagrad": ["--server-optimizer", "fedadagrad"],
    "FedProx mu=0.01": ["--proximal-mu", "0.01"],
    "FedProx mu=0.1": ["--proximal-mu", "0.1"],
    "FedProx mu=1": ["--proximal-mu", "1"],
}


def accuracies(flags: list[str], rounds: int, seed: int, output: Path) -> list[float]:
    """The global model's test accuracy after each round."""
    run(["local", "--workers", str(WORKERS), "--shard", "dirichlet", "--dirichlet-alpha", str(ALPHA),
         "--interval-steps", str(INTERVAL_STEPS), "--rounds", str(rounds), "--eval-every", "1",
         "--seed", str(seed), *flags], output)
    records = json.loads((output / "metrics.json").read_text())["rounds"]
    if [r["round"] for r in records] != list(range(1, rounds + 1)):
        raise RuntimeError(f"expected a test after each of {rounds} rounds; metrics.json has rounds "
                           f"{[r['round'] for r in records]}")
    return [r["eval_accuracy"] for r in records]


def rounds_to_target(curve: list[float]) -> float:
    """The first round whose test accuracy reached the target; infinity if none did."""
    return next((r for r, a in enumerate(curve, 1) if a >= TARGET_ACCURACY), math.inf)


def shown(rounds: float) -> str:
    return "never" if math.isinf(rounds) else f"{rounds:g}"


def table(curves: dict[str, list[list[float]]], rounds: int) -> list[str]:
    lines = [f"{'algorithm':<22}{'rounds to 0.90':>16}{'accuracy @30':>14}{f'accuracy @{rounds}':>14}"
             f"   per seed: rounds to 0.90; accuracy @30"]
    for label, seeds in curves.items():
        reached = [rounds_to_target(c) for c in seeds]
        at = [c[REPORTED_ROUND - 1] for c in seeds]
        lines.append(f"{label:<22}{shown(statistics.median(reached)):>16}{statistics.median(at):>14.3f}"
                     f"{statistics.median(c[-1] for c in seeds):>14.3f}   "
                     f"{' '.join(shown(r) for r in reached)}; {' '.join(f'{a:.3f}' for a in at)}")
    return lines


def plot(curves: dict[str, list[list[float]]], path: Path) -> None:
    """Left, the server optimizers; right, FedProx's mus; FedAvg in both."""
    figure = Figure(figsize=(13, 5), layout="constrained")
    panels = dict(zip(("server optimizers", "FedProx on the workers"), figure.subplots(1, 2, sharey=True), strict=True))
    for index, (label, seeds) in enumerate(curves.items()):
        rounds = range(1, len(seeds[0]) + 1)
        median = [statistics.median(c[i] for c in seeds) for i in range(len(seeds[0]))]
        chosen = [axes for title, axes in panels.items()
                  if label == "FedAvg" or label.startswith("FedProx") == title.startswith("FedProx")]
        for axes in chosen:
            for curve in seeds:
                axes.plot(rounds, curve, color=f"C{index}", alpha=0.2, linewidth=0.8)
            axes.plot(rounds, median, color=f"C{index}", linewidth=2, label=label)
    for title, axes in panels.items():
        axes.axhline(TARGET_ACCURACY, color="gray", linestyle="--", linewidth=1)
        axes.set_title(title)
        axes.set_xlabel(f"round ({INTERVAL_STEPS} local steps of each of {WORKERS} workers)")
        axes.set_ylim(0.3, 1)
        axes.grid(alpha=0.3)
        axes.legend(loc="lower right")
    panels["server optimizers"].set_ylabel("test accuracy of the global model")
    figure.suptitle(f"Dirichlet({ALPHA:g}) shards of the digits: median over the seeds (bold), each seed (faint)")
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=60, help=f"at least {REPORTED_ROUND}")
    parser.add_argument("--only", nargs="+", metavar="LABEL", help="run only these (labels as in the table)")
    args = parser.parse_args()
    if args.rounds < REPORTED_ROUND:
        parser.error(f"--rounds must be at least {REPORTED_ROUND}. Received: --rounds={args.rounds}")
    chosen = {k: v for k, v in ALGORITHMS.items() if not args.only or k in args.only}
    header = [f"bench/non_iid.py, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
              f"load {os.getloadavg()[0]:.1f} at the start, Python {platform.python_version()}",
              f"basic model, embedded digits (1,437 training, 360 test images), {WORKERS} workers on "
              f"Dirichlet({ALPHA:g}) shards, {INTERVAL_STEPS} local steps (Adam 1e-3, batch 32) a round, "
              f"{args.rounds} rounds, test after every round; seeds {' '.join(map(str, args.seeds))} "
              f"(the same for every algorithm; medians shown)", ""]
    curves: dict[str, list[list[float]]] = {label: [] for label in chosen}
    with tempfile.TemporaryDirectory() as workdir:
        for seed in args.seeds:
            for label, flags in chosen.items():
                started = time.monotonic()
                output = Path(workdir) / f"{seed}-{label.replace(' ', '_')}"
                curves[label].append(accuracies(flags, args.rounds, seed, output))
                print(f"[{time.strftime('%H:%M:%S')}] seed {seed}, {label}: rounds to 0.90 "
                      f"{shown(rounds_to_target(curves[label][-1]))}, accuracy @30 "
                      f"{curves[label][-1][REPORTED_ROUND - 1]:.3f} ({time.monotonic() - started:.0f} s)",
                      flush=True)
    text = "\n".join([*header, *table(curves, args.rounds)]) + "\n" + NOTES
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "non_iid.txt").write_text(text)
    plot(curves, RESULTS / "non_iid.png")


NOTES = """
rounds to 0.90: the first round after which the global model's test accuracy was 0.90 or more (never: not
within the rounds run); accuracy @N: the global model's test accuracy after round N. The test set has 360
images, so one image is 0.003.
"""


if __name__ == "__main__":
    main()
