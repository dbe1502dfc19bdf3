"""A coMind cluster on this machine for the tutorials: one ps and N workers as processes.

The same processes as on real machines (``python -m comind ps`` and
``python -m comind worker``), talking gRPC over loopback. Settings travel as
``COMIND_*`` variables, exactly as in a container; each process ignores the
ones it does not use.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

#: Where each run writes its logs, model, metrics and pictures (git-ignored).
OUTPUT = Path(os.environ.get("TUTORIALS_OUTPUT_DIR") or Path(__file__).resolve().with_name("output"))

_LISTENING = re.compile(r"Listening on \S+:(\d+)")
_ROUND = re.compile(r"^(\S+ \S+) INFO comind\.ps: Round (\d+)/\d+: ")


@dataclasses.dataclass
class Run:
    """What a finished run left behind in ``output_dir``."""

    output_dir: Path

    @property
    def metrics(self) -> dict:
        """The chief's ``metrics.json``: one record per round, and the final evaluation."""
        return json.loads((self.output_dir / "metrics.json").read_text())

    def log(self, name: str = "ps") -> str:
        return (self.output_dir / "logs" / f"{name}.log").read_text()

    def round_times(self) -> tuple[list[int], list[float]]:
        """Each round the ps closed, and when (seconds after the first), from its log lines' timestamps."""
        rounds, stamps = [], []
        for line in self.log("ps").splitlines():
            match = _ROUND.match(line)
            if match:
                rounds.append(int(match.group(2)))
                stamps.append(datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
        return rounds, [stamp - stamps[0] for stamp in stamps]


def run_cluster(name: str, workers: int = 2, timeout: float = 300, **settings) -> Run:
    """Runs a ps and ``workers`` workers to the end of training, and returns their outputs.

    ``settings`` are coMind settings by name (``interval_steps=1`` becomes
    ``COMIND_INTERVAL_STEPS=1``). Every process is stopped before this
    returns, even on an error or an interrupt.
    """
    output = OUTPUT / name
    shutil.rmtree(output, ignore_errors=True)
    (output / "logs").mkdir(parents=True)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("COMIND_")}
    environment.update({f"COMIND_{key.upper()}": str(value) for key, value in settings.items()})
    environment.update(COMIND_NUM_WORKERS=str(workers), COMIND_OUTPUT_DIR=str(output),
                       COMIND_TOKEN=secrets.token_hex(16),  # a fresh shared secret for this run
                       COMIND_METRICS_PORT="0", TF_CPP_MIN_LOG_LEVEL="2")
    processes = []
    try:
        ps = _start("ps", output, {**environment, "COMIND_LISTEN": "127.0.0.1:0"})  # port 0: any free port
        processes.append(ps)
        address = f"127.0.0.1:{_port(ps, output)}"
        for task in range(workers):
            processes.append(_start(f"worker-{task}", output, {**environment, "COMIND_PS_ADDRESS": address,
                                                                 "COMIND_TASK_INDEX": str(task)}))
        deadline = time.monotonic() + timeout
        for process in processes:
            if process.wait(timeout=max(1, deadline - time.monotonic())) != 0:
                raise RuntimeError(f"{process.name} failed (exit {process.returncode}); the end of its log:\n"
                                   + (output / "logs" / f"{process.name}.log").read_text()[-3000:])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    return Run(output)


def _start(name: str, output: Path, environment: dict[str, str]) -> subprocess.Popen:
    role = name.split("-")[0]
    with open(output / "logs" / f"{name}.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "comind", role], env=environment,
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    process.name = name
    return process


def _port(ps: subprocess.Popen, output: Path, timeout: float = 60) -> int:
    """The port the ps picked, from its line "Listening on HOST:PORT"."""
    log = output / "logs" / "ps.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = _LISTENING.search(log.read_text())
        if match:
            return int(match.group(1))
        if ps.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"The ps did not start listening; its log:\n{log.read_text()[-3000:]}")
