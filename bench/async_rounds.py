"""Synchronous against asynchronous rounds (FedBuff) with workers of unequal speed: wall time to 0.95 test accuracy.

Three workers train softmax regression on IID shares of the embedded digits
(``tests/digits_worker.py``'s NumPy SGD: 10 steps of batch 32 at learning
rate 0.5 an update), one at full speed, one 2x and one 5x slower: each
sleeps 10, 20 and 50 ms a step, which stands for machines of unequal speed
(their training itself takes well under a millisecond a step). The ps is a
real ``comind ps`` process; the workers are real processes with
:class:`comind.WorkerClient`. Each configuration runs until the global
model's test accuracy reaches 0.95 (the chief, the fast worker, tests every
new model it receives, on the 360 test images) and a few seconds more:

* sync: every round waits for all three workers;
* sync, 2 of 3: ``--replicas-to-aggregate 2``, the original's backup workers:
  a round closes at the first two updates, and the slow worker's is stale;
* async: ``--rounds-mode async --buffer-size 2`` (a = 0.5, max staleness 10);
* async, C=2: ``--clients-per-round 2`` too: at most two workers train at
  once, each turn that ends passing to one drawn from the other two (the
  buffer's default, half of C: K = 1). The chief tests the models it trains
  from, so under sampling it sees the target up to one turn late.

    .venv/bin/python bench/async_rounds.py [--repeats 3]

Prints, per configuration, the median over the repeats of the seconds to
0.95, and the updates sent and wasted (refused as stale) until then; writes
the table to bench/results/async_rounds.txt and the accuracy curves of the
first repeat to bench/results/async_rounds.png.
"""

from __future__ import annotations

import argparse
import datetime
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

import numpy as np
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from comind import WorkerClient, datasets, sharding  # noqa: E402
from comind.ps_main import LISTENING  # noqa: E402
from digits_worker import CLASSES, FEATURES, INIT_STD, accuracy, features, sgd  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TARGET_ACCURACY = 0.95
#: Seconds each worker sleeps per local step: full speed, 2x and 5x slower.
STEP_SECONDS = (0.01, 0.02, 0.05)
STEPS = 10
#: After the target, so that the curves show where each settles.
EXTRA_SECONDS = 5.0
LONGEST_SECONDS = 120.0
CONFIGURATIONS = {
    "sync": [],
    "sync, 2 of 3": ["--replicas-to-aggregate", "2"],
    "async, K=2": ["--rounds-mode", "async", "--buffer-size", "2"],
    "async, C=2, K=1": ["--rounds-mode", "async", "--clients-per-round", "2"],
}
#: The ps's lines for updates it refused as stale, in either mode, with their time.
STALE = re.compile(r"^(\S+ \S+) INFO comind\.ps: (?:A stale update|Refused a stale update)", re.MULTILINE)


def work(address: str, task: int, out: Path) -> None:
    """One worker: trains, sleeps its share, pushes, and logs each sync (the chief: each new model's accuracy)."""
    data = datasets.load("digits")
    mine = sharding.shard(data.y_train, len(STEP_SECONDS), task, "iid")
    x, y = features(data.x_train[mine]), data.y_train[mine]
    x_test = features(data.x_test)
    rng = np.random.default_rng(task)
    with WorkerClient(address, task_index=task) as client, open(out, "w", buffering=1) as log:
        initial = np.random.default_rng(1234).normal(0, INIT_STD, (FEATURES, CLASSES)).astype(np.float32)
        state, tested = client.join([initial, np.zeros(CLASSES, np.float32)]), -1
        while not state.done:
            if task == 0 and state.round != tested:
                log.write(json.dumps({"t": time.time(), "round": state.round,
                                      "accuracy": accuracy(state.weights, x_test, data.y_test)}) + "\n")
                tested = state.round
            weights = sgd(state.weights, x, y, STEPS, rng)
            time.sleep(STEP_SECONDS[task] * STEPS)
            state = client.sync(weights, num_examples=len(x))
            log.write(json.dumps({"t": time.time(), "sent": True}) + "\n")


def run(flags: list[str], workdir: Path) -> dict:
    """One configuration to the target and a little past it: the chief's curve, and the updates until the target."""
    ps = subprocess.Popen([sys.executable, "-m", "comind", "ps", "--listen", "127.0.0.1:0", "--num-workers",
                           str(len(STEP_SECONDS)), "--rounds", "100000", "--metrics-port", "0", *flags], cwd=ROOT,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, "COMIND_LOG_LEVEL": "info"})
    assert ps.stderr is not None
    lines = []
    while not (match := LISTENING.search(line := ps.stderr.readline())):
        lines.append(line)
        if not line:
            raise RuntimeError("the ps did not start:\n" + "".join(lines))
    outs = [workdir / f"worker-{task}.jsonl" for task in range(len(STEP_SECONDS))]
    workers = [subprocess.Popen([sys.executable, __file__, "--worker", f"127.0.0.1:{match.group(1)}", str(task),
                                 str(outs[task])], stderr=subprocess.DEVNULL) for task in range(len(STEP_SECONDS))]
    try:
        reached = _wait_for_target(outs[0])
        time.sleep(EXTRA_SECONDS)
    finally:
        for process in (*workers, ps):
            process.kill()
            process.wait()
    log = ps.stderr.read()
    records = [[json.loads(line) for line in out.read_text().splitlines()] for out in outs]
    curve = [r for r in records[0] if "accuracy" in r]
    start = curve[0]["t"]
    stale = [_timestamp(t) for t in STALE.findall(log)]
    return {"curve": [(r["t"] - start, r["accuracy"]) for r in curve],
            "seconds": None if reached is None else reached - start,
            "sent": sum(1 for rs in records for r in rs if "sent" in r and (reached is None or r["t"] <= reached)),
            "wasted": sum(1 for t in stale if reached is None or t <= reached),
            "versions": max(r["round"] for r in curve if reached is None or r["t"] <= reached)}


def _wait_for_target(chief: Path) -> float | None:
    """When the chief first tested the target accuracy; None if not within :data:`LONGEST_SECONDS`."""
    deadline = time.monotonic() + LONGEST_SECONDS
    while time.monotonic() < deadline:
        if chief.exists():
            for line in chief.read_text().splitlines():
                record = json.loads(line) if line.endswith("}") else {}
                if record.get("accuracy", 0) >= TARGET_ACCURACY:
                    return float(record["t"])
        time.sleep(0.1)
    return None


def _timestamp(text: str) -> float:
    """A log line's time (logging's asctime, local time with milliseconds) as Unix time."""
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def plot(runs: dict[str, dict], path: Path) -> None:
    figure = Figure(figsize=(9, 5), layout="constrained")
    axes = figure.subplots()
    for label, result in runs.items():
        seconds, accuracies = zip(*result["curve"], strict=True)
        axes.plot(seconds, accuracies, label=label, linewidth=1.5)
    axes.axhline(TARGET_ACCURACY, color="gray", linestyle="--", linewidth=1)
    axes.set_xlabel("wall time since the chief's first model (s)")
    axes.set_ylabel("test accuracy of the global model")
    axes.set_ylim(0.5, 1)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.suptitle("3 workers, 1x, 2x and 5x slower: synchronous and asynchronous (FedBuff) rounds")
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=3, metavar=("ADDRESS", "TASK", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work(args.worker[0], int(args.worker[1]), Path(args.worker[2]))
        return
    header = [f"bench/async_rounds.py, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
              f"load {os.getloadavg()[0]:.1f} at the start, Python {platform.python_version()}",
              f"softmax regression on IID thirds of the embedded digits (1,437 training, 360 test images), "
              f"{STEPS} SGD steps an update; workers sleep {', '.join(f'{s * 1000:g}' for s in STEP_SECONDS)} ms a "
              f"step; {args.repeats} repeats (medians shown)", "",
              f"{'configuration':<16}{'s to 0.95':>11}{'versions':>10}{'updates sent':>14}{'wasted':>8}"
              f"   per repeat: s to 0.95; wasted"]
    results: dict[str, list[dict]] = {label: [] for label in CONFIGURATIONS}
    with tempfile.TemporaryDirectory() as workdir:
        for repeat in range(args.repeats):
            for label, flags in CONFIGURATIONS.items():
                directory = Path(workdir) / f"{repeat}-{label.replace(' ', '_').replace(',', '')}"
                directory.mkdir()
                result = run(flags, directory)
                results[label].append(result)
                print(f"[{time.strftime('%H:%M:%S')}] {label}, repeat {repeat}: {_shown(result['seconds'])} s to "
                      f"{TARGET_ACCURACY}, {result['sent']} updates sent, {result['wasted']} wasted", flush=True)
    rows = []
    for label, runs in results.items():
        seconds = [r["seconds"] if r["seconds"] is not None else float("inf") for r in runs]
        rows.append(f"{label:<16}{_shown(statistics.median(seconds)):>11}"
                    f"{statistics.median(r['versions'] for r in runs):>10g}"
                    f"{statistics.median(r['sent'] for r in runs):>14g}"
                    f"{statistics.median(r['wasted'] for r in runs):>8g}"
                    f"   {' '.join(_shown(s) for s in seconds)}; {' '.join(str(r['wasted']) for r in runs)}")
    text = "\n".join([*header, *rows]) + "\n" + NOTES
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "async_rounds.txt").write_text(text)
    plot({label: runs[0] for label, runs in results.items()}, RESULTS / "async_rounds.png")


def _shown(seconds: float | None) -> str:
    return "never" if seconds is None or seconds == float("inf") else f"{seconds:.1f}"


NOTES = """
s to 0.95: wall time from the chief's first global model to the first it tested at 0.95 or more; versions: the
rounds (async: model versions) published by then; updates sent: by the three workers until then; wasted: of
those, updates the ps refused as stale (sync, 2 of 3: the slow worker's, after each round closed without it;
async: none unless staler than --max-staleness). async, C=2, K=1: client sampling lets two workers train at once,
and each version is one update; the chief tests only the models of its own turns, so its time to 0.95 may be up to
a turn late. The test set has 360 images, so one image is 0.003.
"""


if __name__ == "__main__":
    main()
