"""Atomic file writes: a crash leaves the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; once written, it is fsynced and renamed over ``path``.

    The temporary name keeps the final suffix (``model.tmp.keras``) for
    writers that insist on one. If the body fails, the temporary file goes.
    """
    final = Path(path)
    temporary = final.with_name(f"{final.stem}{TEMPORARY_SUFFIX}{final.suffix}")
    try:
        yield temporary
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
