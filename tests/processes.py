"""Real ps processes on loopback, and what the tests read about processes: plain code, imported by the
tests and by conftest.py's fixtures."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from comind.ps_main import LISTENING

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    """A process's resident memory now, in MiB, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


class PsProcess:
    """A ``comind ps`` subprocess whose log is collected as it runs."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, port: int = 0,
                 host: str = "127.0.0.1", launcher: tuple[str, ...] = ()):
        self.args = args
        self.lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        command = [*launcher, sys.executable, "-m", "comind", "ps", "--listen", f"{host}:{port}", *args]
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     cwd=ROOT, env={**os.environ, "COMIND_METRICS_PORT": "0", **(env or {})})
        threading.Thread(target=self._collect, daemon=True).start()
        match = self.wait_for(LISTENING, timeout=30)
        self.port = int(match.group(1))
        self.address = f"{host}:{self.port}"

    def _collect(self) -> None:
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def wait_for(self, pattern: str | re.Pattern, timeout: float = 30, start: int = 0) -> re.Match:
        """The first log line from index ``start`` on that matches, waiting for it."""
        pattern = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    match = pattern.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._eof:
                    raise AssertionError(f"No log line matched {pattern.pattern!r}; log:\n" + self.log())
                self._changed.wait(remaining)

    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
