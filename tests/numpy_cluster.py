"""Starting and checking ``tests/numpy_worker.py`` processes, for the cluster tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from processes import ROOT

WORKER = ROOT / "tests" / "numpy_worker.py"


def start_worker(address: str, task: int, out: Path, *, examples: int = 100, delta: float = 1.0,
                 pause: float = 0.0, launcher: tuple[str, ...] = (), token: str | None = None,
                 rows: int = 100, delta_step: float = 0.0, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A worker process; ``launcher`` prefixes its command (``ip netns exec NAME``); ``rows`` sizes its model
    (4 KB per 100); its delta grows by ``delta_step`` a round; ``env`` adds to its environment."""
    return subprocess.Popen([*launcher, sys.executable, WORKER, address, str(task), "--examples", str(examples),
                             "--delta", str(delta), "--delta-step", str(delta_step), "--out", str(out),
                             "--pause", str(pause), "--rows", str(rows),
                             *(["--token", token] if token else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def assert_finishes(worker: subprocess.Popen, ps, timeout: float = 120) -> None:
    """The worker exits 0 in time; otherwise the failure shows its log and the ps's."""
    try:
        code = worker.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        code = f"still running after {timeout} s"
    if code != 0:
        raise AssertionError(f"worker: {code}\n{worker.stderr.read()}\nps:\n{ps.log()}")


def kill_one_and_finish(workers: list[subprocess.Popen], gone: int, ps, within: float = 60) -> None:
    """SIGKILLs ``workers[gone]``; the others and the ps (``processes.Process``) exit 0, the workers ``within``
    seconds of the kill: sooner than a round timeout set longer."""
    workers[gone].send_signal(signal.SIGKILL)
    workers[gone].wait()
    started = time.monotonic()
    for task, worker in enumerate(workers):
        if task != gone:
            assert_finishes(worker, ps, timeout=within)
    assert time.monotonic() - started < within
    assert ps.wait(timeout=30) == 0


def read_history(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_value(round: int, examples: list[int], deltas: list[float]) -> float:
    """Each round adds the example-weighted mean of the workers' deltas to every weight."""
    return round * float(np.average(deltas, weights=examples))
