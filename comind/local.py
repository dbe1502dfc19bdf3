"""``comind local``: a ps and N workers as processes on this machine.

The real thing in miniature: the same processes, over real gRPC on
loopback, with a fresh token. The ps's per-round lines are shown as they
come, about :data:`SHOWN_ROUNDS` rounds' of a long run; each process's full
log goes to ``OUTPUT_DIR/logs``.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from comind.metrics import url_host
from comind.ps_main import LISTENING
from comind.settings import LOCAL_ONLY, LocalSettings, variables

log = logging.getLogger(__name__)

#: The least memory one worker takes: a process with TensorFlow (the basic model on the digits peaks at 590 MB,
#: with 25 threads on 2 cores). More workers than the machine has memory for cannot run.
WORKER_MEMORY_BYTES = 512 << 20
_SHOWN = re.compile(r"(Round \d+/\d+: .*|Round \d+ evaluation: .*|Training is done.*)")
_ROUND = re.compile(r"Round (\d+)(?:/(\d+))?")
#: Rounds whose lines a long run shows (the ps's log has every round's): 1,500 rounds printed 1,604 lines.
SHOWN_ROUNDS = 100
_ENDED = object()
#: How long workers may go on once the ps has ended (normally: they left it, and are writing their outputs).
WORKER_GRACE_SECONDS = 20.0


def run_local(settings: LocalSettings) -> int:
    """Runs a cluster of one ps and ``settings.workers`` workers to the end; returns an exit status.

    Raises:
        ValueError: more workers than the machine can hold, or a metrics port in use; nothing started.
    """
    workers = settings.workers
    check_workers(workers)
    ports = _metrics_ports(settings)
    logs = Path(settings.worker.output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    environment = _environment(settings)
    events: queue.Queue = queue.Queue()
    processes: list[subprocess.Popen] = []
    try:
        ps = _start("ps", {**environment, "COMIND_LISTEN": settings.ps.listen,
                           "COMIND_METRICS_PORT": str(ports[0])},
                    logs / "ps.log", events, _PsLines(every_round=settings.log_level == "debug"))
        processes.append(ps)
        port = _wait_for_port(events, ps, logs / "ps.log")
        for task in range(workers):
            processes.append(_start("worker", {**environment, "COMIND_PS_ADDRESS": f"127.0.0.1:{port}",
                                               "COMIND_TASK_INDEX": str(task),
                                               "COMIND_METRICS_PORT": str(ports[1 + task])},
                                    logs / f"worker-{task}.log", events, show_stdout=task == 0))
        print(f"ps on 127.0.0.1:{port}; {workers} workers; logs in {logs}; {_where_metrics_are(settings)}", flush=True)
        return _follow(events, processes, logs)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()


def check_workers(workers: int) -> None:
    """Refuses more workers than this machine has memory for; warns of more than it has cores.

    Raises:
        ValueError: the workers cannot all run here.
    """
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    most = max(1, memory // WORKER_MEMORY_BYTES)
    if workers > most:
        raise ValueError(f"{workers} workers cannot run on this machine: each is a process with TensorFlow that "
                         f"needs at least {WORKER_MEMORY_BYTES >> 20} MB, and its {memory / 2**30:.0f} GB hold "
                         f"{most}. Start fewer, or run them on more machines (README: On separate machines). "
                         f"Received: --workers={workers}")
    cores = os.cpu_count() or 1
    if workers > cores:
        log.warning("%d workers share %d cores: each trains at a fraction of a core's speed.", workers, cores)


def _metrics_ports(settings: LocalSettings) -> list[int]:
    """Each process's metrics port, the ps's first (all 0 when metrics are off), checked free.

    Raises:
        ValueError: a port is beyond 65535, or in use.
    """
    first, host, workers = settings.ps.metrics_port, settings.ps.metrics_host, settings.workers
    if not first:
        return [0] * (1 + workers)
    ports = list(range(first, first + 1 + workers))
    advice = (f"`comind local` serves the ps's metrics on COMIND_METRICS_PORT and worker i's on that port plus "
              f"1 + i: set COMIND_METRICS_PORT to the first of {1 + workers} free ports (0 turns metrics off), or "
              f"COMIND_METRICS_HOST to an address of this machine. Received: metrics_port={first}, "
              f"metrics_host={host!r}")
    if ports[-1] > 65535:
        raise ValueError(f"The metrics ports of the ps and {workers} workers run past 65535; {advice}")
    for index, port in enumerate(ports):
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the metrics server binds
            try:
                probe.bind(address)
            except OSError as error:
                who = "the ps" if index == 0 else f"worker {index - 1}"
                raise ValueError(f"Cannot serve {who}'s metrics on port {port} of {host!r} ({error.strerror}); "
                                 f"{advice}") from None
    return ports


def _where_metrics_are(settings: LocalSettings) -> str:
    first, host, workers = settings.ps.metrics_port, settings.ps.metrics_host, settings.workers
    if not first:
        return "metrics off"
    return (f"metrics on http://{url_host(host, first)}/metrics (the ps) and ports {first + 1} to {first + workers} "
            f"(workers 0 to {workers - 1})")


def _environment(settings: LocalSettings) -> dict[str, str]:
    """The variables of every process: the settings given, less those local sets itself; a fresh token."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("COMIND_") and k != "TF_CONFIG"}
    for part in (settings.ps, settings.worker):
        environment.update(variables(part, leave_out=LOCAL_ONLY))
    # Every process's metrics where the ps's are (by default where it listens: loopback).
    environment.update(COMIND_NUM_WORKERS=str(settings.workers), COMIND_TOKEN=secrets.token_hex(16),
                       COMIND_METRICS_HOST=settings.ps.metrics_host)
    environment.pop("COMIND_TOKEN_FILE", None)
    return environment


class _PsLines:
    """Picks the ps's lines to show: of a long run, those of the first round, every ``ceil(rounds /
    SHOWN_ROUNDS)``-th and the last (each round's at debug level), and the end of training."""

    def __init__(self, every_round: bool):
        self.every_round = every_round
        self.every, self.last = 1, 0  # until a round line gives the number of rounds

    def __call__(self, line: str) -> str | None:
        shown = _SHOWN.search(line)
        if shown is None:
            return None
        round = _ROUND.match(shown.group(1))
        if round is None or self.every_round:
            return shown.group(1)
        number, total = int(round.group(1)), round.group(2)
        if total:  # a round's own line; its evaluation's comes later, without the number of rounds
            self.every, self.last = math.ceil(int(total) / SHOWN_ROUNDS), int(total)
        return shown.group(1) if number == 1 or number % self.every == 0 or number == self.last else None


def _start(role: str, environment: dict[str, str], log: Path, events: queue.Queue,
           shown: Callable[[str], str | None] = lambda line: None, show_stdout: bool = False) -> subprocess.Popen:
    """Starts ``comind ROLE``: its stderr goes to ``log``, what ``shown`` picks from it to the screen."""
    process = subprocess.Popen([sys.executable, "-m", "comind", role], env=environment, text=True,
                               stdout=subprocess.PIPE if show_stdout else subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    threading.Thread(target=_pump, args=(process, log, events, shown), daemon=True).start()
    if show_stdout:  # the chief's summary lines
        threading.Thread(target=_echo, args=(process.stdout, events), daemon=True).start()
    return process


def _pump(process: subprocess.Popen, log: Path, events: queue.Queue, shown: Callable[[str], str | None]) -> None:
    """Copies a process's stderr to its log and the lines to show to the queue, then reports its end."""
    assert process.stderr is not None  # started with stderr=PIPE
    with open(log, "w") as file:
        for line in process.stderr:
            file.write(line)
            file.flush()
            events.put((process, line, shown(line.rstrip("\n"))))
    events.put((process, _ENDED, None))


def _echo(stream: Iterable[str], events: queue.Queue) -> None:
    for line in stream:
        events.put((None, line, line.rstrip("\n")))


def _wait_for_port(events: queue.Queue, ps: subprocess.Popen, log: Path) -> int:
    """The port the ps listens on, once it says.

    Raises:
        ValueError: the ps refused its settings (exit 2), with its one-line reason.
        RuntimeError: it stopped otherwise, with the end of its log.
    """
    while True:
        _, line, _ = events.get(timeout=60)
        if line is _ENDED:
            text = log.read_text()
            if ps.wait() == 2:  # bad settings: its last line says which, in one line
                reason = text.strip().rpartition("\n")[2].removeprefix("comind ps: error: ")
                raise ValueError(f"The ps refused its settings: {reason}")
            raise RuntimeError(f"The ps stopped (exit {ps.returncode}) before it listened; see {log}:\n{text[-2000:]}")
        match = LISTENING.search(line)
        if match:
            return int(match.group(1))


def _follow(events: queue.Queue, processes: list[subprocess.Popen], logs: Path) -> int:
    """Shows progress until every process ended; stops the rest as soon as one fails, or when the workers outlive
    the ps by :data:`WORKER_GRACE_SECONDS` (it was stopped: they would retry it for minutes)."""
    running = len(processes)
    deadline: float | None = None  # once the ps has ended
    while running:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            process, line, shown = events.get(timeout=wait)
        except queue.Empty:
            print(f"The ps exited (status {processes[0].returncode}) and {running} workers were still running "
                  f"{WORKER_GRACE_SECONDS:.0f} s later; stopping them. See {logs / 'ps.log'} for why it ended.",
                  file=sys.stderr)
            return 1
        if line is not _ENDED:
            if shown:
                print(shown, flush=True)
            continue
        running -= 1
        if process.wait() != 0:
            name = "ps" if process is processes[0] else f"worker-{processes.index(process) - 1}"
            tail = (logs / f"{name}.log").read_text()[-3000:]
            print(f"{name} failed (exit {process.returncode}); the end of its log:\n{tail}", file=sys.stderr)
            return 1
        if process is processes[0]:
            deadline = time.monotonic() + WORKER_GRACE_SECONDS
    return 0
