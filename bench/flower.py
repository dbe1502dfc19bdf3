"""coMind against Flower: the same federated task, side by side, on this machine.

Both systems train coMind's basic classifier (Flatten, Dense 128 relu,
Dense 10; Adam 1e-3, batch 32) on a generated Fashion-MNIST-shaped data set
(bench/vs_flower/dataset.py), split contiguously across W workers: R rounds
of S local steps, example-weighted FedAvg, and the global model tested on
the 10,000 test images after every round.

* coMind: a ``comind ps`` and W ``comind worker`` processes.
* Flower 1.42.0 in its deployment mode: a SuperLink, W SuperNodes and
  ``flwr run`` (bench/vs_flower/flower_side.py says which settings and why),
  in its own virtual environment, bench/.venv-flower, which the first run
  creates (flwr needs protobuf 6, coMind protobuf 7).

Configurations: W=2 R=10 S=100; W=4 R=5 S=100; W=2 R=20 S=10 (communication
heavy). Each repeat runs every configuration on both systems with a seed of
its own (the same for both), alternating which goes first, so that drift in
the machine's load hits both. About 6
minutes a repeat on 2 idle cores, nearly all of it Flower's (15 on a busy
machine):

    .venv/bin/python bench/flower.py [--repeats 3]

Prints a table per configuration (medians over the repeats; the wall-time
ratio is the median of each repeat's own ratio) and writes it to
bench/results/flower.txt, and test accuracy against wall-clock time to
bench/results/flower.png. MB are 10**6 bytes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from matplotlib.figure import Figure

from vs_flower import comind_side, dataset, flower_side
from vs_flower.measure import RunResult

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CONFIGS = [(2, 10, 100), (4, 5, 100), (2, 20, 10)]  # (W, R, S)
SYSTEMS = {"coMind": comind_side.run, "Flower": flower_side.run}
WALL_RATIO_TARGET = 1 / 8
ACCURACY_TARGET = 0.01
OVERHEAD_TARGET = 0.05
MB = 1e6


def label(config: tuple[int, int, int]) -> str:
    return "W={}, R={}, S={}".format(*config)


def measure(repeats: int, workdir: Path) -> dict[tuple, dict[str, list[RunResult]]]:
    data = dataset.write(workdir / "data.npz")
    results = {config: {system: [] for system in SYSTEMS} for config in CONFIGS}
    for repeat in range(repeats):
        # Alternate the order, so that neither system always runs on a machine the other just warmed.
        order = list(SYSTEMS) if repeat % 2 == 0 else list(SYSTEMS)[::-1]
        for config in CONFIGS:
            for system in order:
                started = time.monotonic()
                # Each repeat has its own seed (initial weights, data order), the same for both systems: one
                # seed's data order moves a short run's accuracy by a point or two, so medians over seeds compare.
                run_dir = workdir / f"{repeat}-{system}-{'-'.join(map(str, config))}"
                run = SYSTEMS[system](data, *config, repeat, run_dir)
                results[config][system].append(run)
                print(f"[{time.strftime('%H:%M:%S')}] repeat {repeat + 1}, {label(config)}, {system}: "
                      f"wall {run.wall_seconds:.1f} s, final accuracy {run.rounds[-1].accuracy:.4f} "
                      f"({time.monotonic() - started:.0f} s with shutdown)", file=sys.stderr, flush=True)
    return results


def median_of(runs: list[RunResult], value: Callable[[RunResult], float]) -> float:
    return statistics.median(value(run) for run in runs)


def table(config: tuple[int, int, int], runs: dict[str, list[RunResult]]) -> tuple[list[str], list[bool]]:
    comind, flower = runs["coMind"], runs["Flower"]
    rows = [
        ("wall time to finish (s)", lambda r: r.wall_seconds, 1, "{:.1f}"),
        ("median round time (s)", lambda r: r.median_round_seconds, 1, "{:.3f}"),
        ("round overhead (s)", lambda r: r.median_overhead_seconds, 1, "{:.3f}"),
        ("round overhead (% of round)", lambda r: statistics.median(r.overhead_fractions), 100, "{:.1f}"),
        ("slowest worker's local training (s)", lambda r: statistics.median(x.train_seconds for x in r.rounds[1:]),
         1, "{:.3f}"),
        (f"test accuracy after round {config[1]}", lambda r: r.rounds[-1].accuracy, 1, "{:.4f}"),
        ("model bytes per round (MB)", lambda r: r.bytes_per_round, 1 / MB, "{:.2f}"),
        ("server peak memory (MB)", lambda r: r.server_peak_bytes, 1 / MB, "{:.0f}"),
        ("worker peak memory (MB)", lambda r: r.worker_peak_bytes, 1 / MB, "{:.0f}"),
    ]
    lines = [f"{label(config)}", f"{'':38}{'coMind':>10}{'Flower':>10}{'coMind/Flower':>15}"]
    for name, value, scale, shape in rows:
        ours, theirs = median_of(comind, value), median_of(flower, value)
        ratio = (statistics.median(value(a) / value(b) for a, b in zip(comind, flower, strict=True))
                 if name.startswith("wall") else ours / theirs)
        lines.append(f"{name:38}{shape.format(ours * scale):>10}{shape.format(theirs * scale):>10}{ratio:>15.3f}")
    for system, system_runs in runs.items():
        per_round = [statistics.median(run.rounds[i].accuracy for run in system_runs)
                     for i in range(config[1])]
        lines.append(f"  test accuracy per round, {system}: {' '.join(f'{a:.3f}' for a in per_round)}")
    wall_ratio = statistics.median(a.wall_seconds / b.wall_seconds for a, b in zip(comind, flower, strict=True))
    accuracy_gap = (median_of(comind, lambda r: r.rounds[-1].accuracy)
                    - median_of(flower, lambda r: r.rounds[-1].accuracy))
    overhead = median_of(comind, lambda r: statistics.median(r.overhead_fractions))
    checks = [
        (f"wall time coMind/Flower {wall_ratio:.3f} <= {WALL_RATIO_TARGET:.3f}", wall_ratio <= WALL_RATIO_TARGET),
        (f"final test accuracy coMind - Flower {accuracy_gap:+.4f}, within {ACCURACY_TARGET}",
         abs(accuracy_gap) <= ACCURACY_TARGET),
        (f"coMind round overhead {overhead:.1%} < {OVERHEAD_TARGET:.0%} of the round", overhead < OVERHEAD_TARGET),
    ]
    lines += [f"  target: {text}: {'PASS' if passed else 'MISS'}" for text, passed in checks]
    return lines, [passed for _, passed in checks]


def plot(results: dict[tuple, dict[str, list[RunResult]]], path: Path) -> None:
    figure = Figure(figsize=(5 * len(results), 4), layout="constrained")
    colors = {"coMind": "tab:blue", "Flower": "tab:orange"}
    for axes, (config, runs) in zip(figure.subplots(1, len(results), squeeze=False)[0], results.items(), strict=True):
        for system, system_runs in runs.items():
            for index, run in enumerate(system_runs):
                axes.plot([r.evaluated for r in run.rounds], [r.accuracy for r in run.rounds], marker=".",
                          color=colors[system], alpha=0.8, label=system if index == 0 else None)
        axes.set_xscale("log")
        axes.set_title(label(config))
        axes.set_xlabel("wall-clock seconds since start (log scale)")
        axes.set_ylabel("test accuracy")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle("Test accuracy against wall-clock time, every repeat")
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating repeats, each with its own seed [3: about 16 minutes on 2 idle cores]")
    args = parser.parse_args()
    flower_version = flower_side.ensure_installed()
    header = [f"bench/flower.py, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
              f"load {os.getloadavg()[0]:.1f} at the start, Python {platform.python_version()}, "
              f"flwr {flower_version}, {args.repeats} alternating repeats (medians shown)",
              "basic model, Adam 1e-3, batch 32, 60,000 generated 28x28 images split contiguously; "
              "test: 10,000 images after every round", ""]
    with tempfile.TemporaryDirectory() as workdir:
        results = measure(args.repeats, Path(workdir))
    lines, verdicts = list(header), []
    for config, runs in results.items():
        block, passed = table(config, runs)
        lines += [*block, ""]
        verdicts += passed
    lines += [f"{verdicts.count(True)} of {len(verdicts)} targets met.", *NOTES]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "flower.txt").write_text(text)
    plot(results, RESULTS / "flower.png")


NOTES = [
    "",
    "Wall time: from starting the first process to knowing the last round's test accuracy (start-up included).",
    "Round time: between consecutive global models, from round 2 on (the server's clock: the ps's log, the",
    "ServerApp's aggregate_train). Round overhead: round time minus the slowest worker's local training in it",
    "(coMind: the S steps of model.fit between syncs; Flower: the ClientApp's model.fit of S steps).",
    "Model bytes: tensor bytes received and sent by the server per round (coMind: comind_update_bytes_total less",
    "the initial model and first pulls; Flower: the .npy bytes of the ArrayRecords in the messages).",
    "Peak memory: largest sampled RSS (every 0.1 s). Server: the ps; the SuperLink with its SuperExec and ServerApp.",
    "Worker: the largest worker process; the largest SuperNode with its SuperExec and ClientApp processes.",
]


if __name__ == "__main__":
    main()
