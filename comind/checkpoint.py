"""Durable global models: one ``.npz`` file per round, written atomically.

A checkpoint is a plain NumPy ``.npz`` (``np.load(path)`` opens it; no
pickle): ``round``, ``names``, the tensors as ``tensor_00000``,
``tensor_00001``, ..., and the state of the round pipeline's stages as
``state/STAGE/NAME`` (``pipeline.py``), so that a restart resumes the
optimizer's moments or a privacy ledger with the model they belong to.
It is written atomically (:mod:`comind.atomic`), so a crash leaves either
the old checkpoint or the new one, never half of one. The ps saves before it
lets any worker have the model (durability before visibility), so no worker
can hold a round that a restarted ps has forgotten.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from comind import atomic
from comind.npz import NpzFile
from comind.tensors import Layout

log = logging.getLogger(__name__)

# [0-9], not \d: \d also matches other scripts' digits, which int() reads as a round.
_NAME = re.compile(r"^round-([0-9]{9})\.npz$")
STATE_PREFIX = "state/"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    round: int
    layout: Layout
    packed: np.ndarray  # the model as one flat uint8 buffer
    state: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)  # the stages', by key


class CheckpointStore:
    """Saves each round's global model in ``directory`` and keeps the last ``keep``."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError(f"At least one checkpoint must be kept. Received: keep={keep}")
        self.directory = Path(directory)
        self.keep = keep
        # Found now, not at the first checkpoint, when workers would already be waiting for round 0.
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for leftover in self.directory.glob(f"*{atomic.TEMPORARY_SUFFIX}.npz"):
                leftover.unlink()  # an interrupted save; its round was never published
            with tempfile.TemporaryFile(dir=self.directory):
                pass
        except OSError as error:
            raise ValueError(f"Cannot write checkpoints to {self.directory} ({error.strerror or error}); set "
                             f"COMIND_CHECKPOINT_DIR to a directory this process may write. Received: "
                             f"checkpoint_dir={str(directory)!r}") from None

    def rounds(self) -> list[int]:
        found = (_NAME.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def path(self, round: int) -> Path:
        return self.directory / f"round-{round:09d}.npz"

    def save(self, round: int, layout: Layout, packed: np.ndarray,
             state: Mapping[str, np.ndarray] | None = None) -> Path:
        saved = self.rounds()
        if saved and round < saved[-1]:
            raise ValueError(
                f"Refusing to save round {round} over round {saved[-1]}: the round number never "
                f"goes backwards."
            )
        final = self.path(round)
        arrays = {"round": np.int64(round), "names": np.array([s.name for s in layout.specs], dtype=str)}
        arrays.update({f"tensor_{i:05d}": view for i, view in enumerate(layout.views(packed))})
        arrays.update({STATE_PREFIX + key: value for key, value in (state or {}).items()})
        with atomic.replacing(final) as temporary, open(temporary, "wb") as file:
            np.savez(file, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as its allow_pickle
        for old in self.rounds()[: -self.keep]:
            self.path(old).unlink(missing_ok=True)
        return final

    def latest(self) -> Checkpoint | None:
        """The newest readable checkpoint; unreadable ones are reported and skipped.

        Raises:
            ValueError: there are checkpoints, and none is readable. Starting
                afresh would begin again at round 0 beside them, and the
                round number never goes backwards.
        """
        rounds = self.rounds()
        for round in reversed(rounds):
            try:
                return self.load(round)
            except (OSError, ValueError) as error:  # NpzError and LayoutError are ValueErrors
                log.error("Checkpoint %s is unreadable (%s); trying the one before it.", self.path(round), error)
        if rounds:
            raise ValueError(f"None of the {len(rounds)} checkpoints in {self.directory} is readable (see the log "
                             f"above). Restore a good one from a backup, or move them away to start training again "
                             f"from round 0. Received: rounds {rounds[0]} to {rounds[-1]}")
        return None

    def load(self, round: int) -> Checkpoint:
        with NpzFile(self.path(round)) as data:
            stored, stored_names = data.read("round"), data.read("names")
            if stored.shape != () or stored.dtype.kind not in "iu":
                raise ValueError(f"its round is not an integer but a {stored.dtype} array of shape {stored.shape}")
            if int(stored) != round:
                raise ValueError(f"file says round {int(stored)}")
            if stored_names.ndim != 1 or stored_names.dtype.kind != "U":
                raise ValueError(f"its names are not a list of text but a {stored_names.dtype} array of shape "
                                 f"{stored_names.shape}")
            names = [str(n) for n in stored_names]
            arrays = [data.read(f"tensor_{i:05d}") for i in range(len(names))]
            state = {name.removeprefix(STATE_PREFIX): data.read(name) for name in data.names
                     if name.startswith(STATE_PREFIX)}
        layout = Layout.of(arrays, names)
        return Checkpoint(round, layout, layout.pack(arrays), state)
