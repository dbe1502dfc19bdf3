"""Fixtures that run real ps processes on loopback."""

from __future__ import annotations

import pytest

from processes import PsProcess


@pytest.fixture
def start_ps():
    """Starts ``comind ps`` processes with the given flags; kills leftovers at the end."""
    started: list[PsProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, port: int = 0, host: str = "127.0.0.1",
              launcher: tuple[str, ...] = ()) -> PsProcess:
        ps = PsProcess(list(args), env, port, host, launcher)
        started.append(ps)
        return ps

    yield start
    for ps in started:
        ps.stop()
