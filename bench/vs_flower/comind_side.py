"""One coMind run: a ``comind ps`` and W ``comind worker`` processes on loopback.

The ps's log gives when each round closed and the test accuracy the chief
reported for it (the chief tests every global model: ``--eval-every 1``);
each worker's debug log gives its local training time per round; the ps's
``comind_update_bytes_total`` gives the model bytes it streamed.
"""

from __future__ import annotations

import datetime
import re
import sys
import time
import urllib.request
from pathlib import Path

from vs_flower.measure import PeakMemory, Round, RunResult, free_port, start, stop, wait_for

ROOT = Path(__file__).resolve().parents[2]
STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "
LISTENING = re.compile(r"Listening on \S+:(\d+)")
CLOSED = re.compile(STAMP + r".*Round (\d+)/\d+: ", re.MULTILINE)
EVALUATED = re.compile(STAMP + r".*Round (\d+) evaluation: loss \S+, accuracy (\d+\.\d+)", re.MULTILINE)
TRAINED = re.compile(r"Round (\d+): \d+ local steps in ([\d.]+) s")


def run(dataset: Path, workers: int, rounds: int, steps: int, seed: int, workdir: Path) -> RunResult:
    workdir.mkdir(parents=True)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TF_CPP_MIN_LOG_LEVEL": "2"}
    task = ["--dataset", str(dataset), "--num-workers", str(workers), "--rounds", str(rounds),
            "--interval-steps", str(steps)]
    ps_log, metrics_port = workdir / "ps.log", free_port()
    launched = time.time()
    ps = start([sys.executable, "-m", "comind", "ps", "--listen", "127.0.0.1:0", *task,
                "--metrics-port", str(metrics_port), "--exit-grace", "10"], ps_log, env)
    processes = [ps]
    try:
        wait_for(lambda: LISTENING.search(ps_log.read_text()), processes, "the ps listened", timeout=60)
        port = LISTENING.search(ps_log.read_text()).group(1)
        # Debug level for comind.federated's per-round timing line.
        worker_processes = [start([sys.executable, "-m", "comind", "worker", "--ps-address", f"127.0.0.1:{port}",
                                   "--task-index", str(index), *task, "--shard", "contiguous", "--model", "basic",
                                   "--batch-size", "32", "--learning-rate", "0.001", "--eval-every", "1",
                                   "--seed", str(seed),
                                   "--metrics-port", "0", "--output-dir", str(workdir / "output"),
                                   "--log-level", "debug"], workdir / f"worker-{index}.log", env)
                              for index in range(workers)]
        processes += worker_processes
        with PeakMemory({"server": [ps], "worker": worker_processes}) as memory:
            last = re.compile(rf"Round {rounds} evaluation:")
            wait_for(lambda: last.search(ps_log.read_text()), processes, "the last round", timeout=1800)
            streamed = _streamed_bytes(metrics_port, workers)
            wait_for(lambda: all(p.poll() is not None for p in processes), [], "the processes to end", 60)
        failed = [p for p in processes if p.returncode != 0]
        if failed:
            raise RuntimeError(f"{' '.join(failed[0].args[:4])} exited with {failed[0].returncode}; logs in {workdir}")
    finally:
        stop(processes)
    return RunResult("coMind", _rounds(ps_log, workdir, workers, launched), streamed / rounds,
                     memory.peak("server"), memory.peak("worker"))


def _streamed_bytes(metrics_port: int, workers: int) -> float:
    """Model bytes the ps received and sent for the rounds: its counter, less the start.

    The counter also holds the chief's initial model and each worker's first
    pull; Flower ships its initial model inside round 1, so those are left out.
    """
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    total = sum(float(m) for m in re.findall(r'^comind_update_bytes_total\{direction="\w+"\} (\S+)', text, re.M))
    model = float(re.search(r"^comind_model_bytes (\S+)", text, re.M).group(1))
    return total - (1 + workers) * model


def _seconds(stamp: str, launched: float) -> float:
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp() - launched


def _rounds(ps_log: Path, workdir: Path, workers: int, launched: float) -> list[Round]:
    text = ps_log.read_text()
    closed = {int(r): _seconds(stamp, launched) for stamp, r in CLOSED.findall(text)}
    evaluated = {int(r): (_seconds(stamp, launched), float(a)) for stamp, r, a in EVALUATED.findall(text)}
    trained: dict[int, float] = {}
    for index in range(workers):
        for r, seconds in TRAINED.findall((workdir / f"worker-{index}.log").read_text()):
            trained[int(r)] = max(trained.get(int(r), 0.0), float(seconds))
    return [Round(r, closed[r], *evaluated[r], trained[r]) for r in sorted(evaluated)]
