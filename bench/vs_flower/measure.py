"""What one run of either system yields, and the process plumbing both runs share."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

#: How often the memory of the processes is read. Flower's ClientApp
#: processes live a few seconds each, so this catches every one of them.
SAMPLE_SECONDS = 0.1


@dataclasses.dataclass(frozen=True)
class Round:
    round: int
    closed: float         # seconds since launch when the new global model existed
    evaluated: float      # seconds since launch when its test accuracy was known
    accuracy: float
    train_seconds: float  # the slowest worker's local training in this round


@dataclasses.dataclass(frozen=True)
class RunResult:
    system: str
    rounds: list[Round]
    bytes_per_round: float
    server_peak_bytes: int
    worker_peak_bytes: int

    @property
    def wall_seconds(self) -> float:
        """From starting the first process until the last round's test accuracy was known."""
        return self.rounds[-1].evaluated

    @property
    def round_seconds(self) -> list[float]:
        """Time between consecutive global models (from round 2: round 1 includes start-up)."""
        return [b.closed - a.closed for a, b in itertools.pairwise(self.rounds)]

    @property
    def overhead_fractions(self) -> list[float]:
        """Per round from round 2: the part of the round that was not the slowest worker's local training."""
        return [(seconds - r.train_seconds) / seconds
                for seconds, r in zip(self.round_seconds, self.rounds[1:], strict=True)]

    @property
    def median_round_seconds(self) -> float:
        return statistics.median(self.round_seconds)

    @property
    def median_overhead_seconds(self) -> float:
        return statistics.median(s - r.train_seconds for s, r in zip(self.round_seconds, self.rounds[1:], strict=True))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(command: Sequence[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Starts ``command`` with its output in ``log``."""
    with open(log, "w") as output:
        return subprocess.Popen(list(command), stdout=output, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def wait_for(condition: Callable[[], bool], processes: Sequence[subprocess.Popen], what: str,
             timeout: float) -> None:
    """Polls ``condition`` until it holds; fails if a process ended first or time ran out."""
    deadline = time.monotonic() + timeout
    while not condition():
        ended = [p for p in processes if p.poll() is not None]
        if ended:
            raise RuntimeError(f"{' '.join(ended[0].args[:3])} exited with {ended[0].returncode} before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def stop(processes: Sequence[subprocess.Popen], grace: float = 10.0) -> None:
    """Stops each process and whatever it started (SIGTERM, then SIGKILL after ``grace``)."""
    # Flower starts its SuperExecs in sessions of their own, out of reach of the killpg below; a ServerApp whose
    # SuperLink was gone kept running for minutes.
    detached = [child for process in processes for child in _descendants(process.pid)]
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, 15)  # its own session: the process and its children
    deadline = time.monotonic() + grace
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)  # leftovers, such as a ClientApp whose parent is gone
        process.wait()
    for child in detached:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


class PeakMemory:
    """Samples the resident memory of process trees in a thread, keeping each tree's peak.

    A tree is a process and all its descendants, summed at each sample (for
    Flower, the SuperNode with its SuperExec and ClientApp processes).
    """

    def __init__(self, roots: dict[str, Sequence[subprocess.Popen]]):
        self._roots = roots
        self._peaks = {name: [0] * len(processes) for name, processes in roots.items()}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()
        self._thread.join()

    def peak(self, name: str) -> int:
        """The largest peak among the trees of ``name``, in bytes."""
        return max(self._peaks[name])

    def _sample_until_stopped(self) -> None:
        while not self._stopped.wait(SAMPLE_SECONDS):
            for name, processes in self._roots.items():
                for index, process in enumerate(processes):
                    total = _tree_rss(process.pid)
                    self._peaks[name][index] = max(self._peaks[name][index], total)


def _tree_rss(pid: int) -> int:
    try:
        tree = [psutil.Process(pid), *_descendants(pid)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):  # ended between listing and reading
            total += process.memory_info().rss
    return total
