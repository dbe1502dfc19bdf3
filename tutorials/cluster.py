"""A coMind cluster on this machine for the tutorials: ``comind local``, one ps and N workers.

``comind local`` starts the same processes as on real machines (``python -m
comind ps`` and ``python -m comind worker``), talking gRPC over loopback.
Settings travel as ``COMIND_*`` variables, exactly as in a container.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

#: Where each run writes its logs, model, metrics and pictures (git-ignored).
OUTPUT = Path(os.environ.get("TUTORIALS_OUTPUT_DIR") or Path(__file__).resolve().with_name("output"))

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
    """Runs ``comind local``: a ps and ``workers`` workers to the end of training; returns their outputs.

    ``settings`` are coMind settings by name (``interval_steps=1`` becomes
    ``COMIND_INTERVAL_STEPS=1``). ``comind local`` stops every process it
    started before it returns, also on an error or an interrupt.
    """
    output = OUTPUT / name
    shutil.rmtree(output, ignore_errors=True)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("COMIND_")}
    environment.update({f"COMIND_{key.upper()}": str(value) for key, value in settings.items()})
    environment.update(COMIND_METRICS_PORT="0", TF_CPP_MIN_LOG_LEVEL="2")
    local = subprocess.Popen([sys.executable, "-m", "comind", "local", "--workers", str(workers),
                              "--output-dir", str(output)], env=environment, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    try:
        printed, _ = local.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        local.send_signal(signal.SIGINT)  # lets it stop its ps and workers
        printed, _ = local.communicate()
    if local.returncode != 0:
        raise RuntimeError(f"comind local failed (exit {local.returncode}):\n{printed[-3000:]}")
    return Run(output)
