"""Training throughput and time to accuracy: `comind local --workers 2` against one process.

Runs, alternately and several times on the same machine, the basic model on
the embedded digits:

* ``comind local --workers 2`` (federated, ``interval_steps=100``), and
* ``comind train`` (one process, no ps),

and prints examples per second (summed over the workers; syncs and the
chief's evaluations included, process start-up excluded), their ratio, and
the seconds of training until the test accuracy first reached 0.95.

    .venv/bin/python bench/training.py [--repeats 3]

Writes its output to bench/results/training.txt as well.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "training.txt"
THROUGHPUT = re.compile(r"trained (\d+) examples in ([\d.]+) s")
TARGET_ACCURACY = 0.95
TARGET_RATIO = 0.9


def run(command: list[str], output: Path) -> None:
    env = {**os.environ, "COMIND_METRICS_PORT": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-m", "comind", *command, "--output-dir", str(output)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=900)
    (output / "stderr.log").write_text(result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"comind {' '.join(command)} failed:\n{result.stderr[-3000:]}")


def examples_per_second(logs: list[str]) -> float:
    """Summed over the processes whose logs are given."""
    rates = [int(n) / float(s) for text in logs for n, s in THROUGHPUT.findall(text)]
    if not rates:
        raise RuntimeError("no throughput line found in the logs")
    return sum(rates)


def seconds_to_accuracy(output: Path) -> float | None:
    records = json.loads((output / "metrics.json").read_text())["rounds"]
    return next((r["elapsed_seconds"] for r in records if (r["eval_accuracy"] or 0) >= TARGET_ACCURACY), None)


def measure(kind: str, workdir: Path) -> dict:
    output = workdir / kind
    if kind == "federated":
        run(["local", "--workers", "2", "--interval-steps", "100"], output)
        logs = [p.read_text() for p in sorted((output / "logs").glob("worker-*.log"))]
    else:
        run(["train"], output)
        logs = [(output / "stderr.log").read_text()]
    final = json.loads((output / "metrics.json").read_text())["final"]["eval_accuracy"]
    return {"rate": examples_per_second(logs), "to_target": seconds_to_accuracy(output), "final": final}


def table(results: dict[str, list[dict]]) -> list[str]:
    lines = [f"{'run':<14}{'examples/s (median)':>22}{'s to 0.95 (median)':>22}{'final accuracy':>17}"]
    for kind, runs in results.items():
        reached = [r["to_target"] for r in runs if r["to_target"] is not None]
        to_target = f"{statistics.median(reached):.2f}" if reached else "never"
        lines.append(f"{kind:<14}{statistics.median(r['rate'] for r in runs):>22.0f}{to_target:>22}"
                     f"{statistics.median(r['final'] for r in runs):>17.4f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lines = [f"bench/training.py, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
             f"Python {platform.python_version()}",
             "basic model, embedded digits, batch 32; federated: 2 workers, interval_steps=100", ""]
    results: dict[str, list[dict]] = {"federated": [], "one process": []}
    with tempfile.TemporaryDirectory() as workdir:
        for repeat in range(args.repeats):  # alternate, so that drift in the machine hits both
            for kind in results:
                results[kind].append(measure(kind, Path(workdir) / f"{repeat}"))
                print(f"repeat {repeat + 1}: {kind}: {results[kind][-1]}", flush=True)
    lines += table(results)
    ratios = [f["rate"] / o["rate"] for f, o in zip(results["federated"], results["one process"], strict=True)]
    ratio = statistics.median(ratios)
    lines += ["", f"throughput ratio federated / one process: median {ratio:.2f} "
                  f"(runs: {', '.join(f'{r:.2f}' for r in ratios)}); target >= {TARGET_RATIO}: "
                  f"{'PASS' if ratio >= TARGET_RATIO else 'MISS'}"]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
