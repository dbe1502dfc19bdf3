"""Asynchronous rounds: buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022, "Federated Learning with
Buffered Asynchronous Aggregation", Algorithm 1).

There is no barrier: a worker pushes its update when its local steps are
done and continues at once from the newest global model. A round is a model
version. An update trained from version ``v`` that arrives when the ps is at
version ``t`` has staleness ``tau = t - v`` and is scaled by

    s(tau) = (1 + tau) ** -a        (a: ``staleness_exponent``, 0.5 by default)

before the aggregator takes it with its weight (``weighting.py``: examples or
uniform). Once ``K`` updates are buffered (``buffer_size``; by default half
the workers that train at once, at least 1: the live ones, or the K that
client sampling lets train at once), the server optimizer takes one step with the
buffer's aggregate and the version increments. With the mean, that aggregate
is ``sum_k w_k s(tau_k) D_k / sum_k w_k``: FedBuff's ``(1/K) sum_k s(tau_k) D_k``
when weights are uniform, so a buffer of equally stale updates is discounted
too (normalizing by ``sum_k w_k s(tau_k)`` would cancel the discount). With
``K`` equal to the workers, all in step (``tau = 0``), it is synchronous
FedAvg. The robust rules (median, trimmed mean) act on the buffer's scaled
updates. Updates staler than ``max_staleness`` are refused as stale.

A worker may push several updates trained from the same version, so the
round number cannot tell a retry from a new update: each update carries a
random id, and :class:`UpdateIds` keeps the last id taken from each task
index (a worker sends one update at a time, so a retry is of its last).
The ids of the updates in published versions are saved in the checkpoint
with the model; a restart discards the partly filled buffer (its updates
were never applied, and their workers have moved on), so no update is
ever applied twice, and none is applied half.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

SYNC, ASYNC = "sync", "async"
ROUNDS_MODES = (SYNC, ASYNC)

#: The stalest update taken unless told otherwise: s(10) = 0.30 at a = 0.5. An update ten versions old was
#: trained from a model that K x 10 updates have moved since, and pulls the model back towards it.
DEFAULT_MAX_STALENESS = 10

#: Bytes of an update's id: random, so that two processes of one task index never share one.
UPDATE_ID_BYTES = 16

#: Where the ids of applied updates lie in a checkpoint's state.
STATE_PREFIX = "async/"


def staleness_weight(staleness: int, exponent: float) -> float:
    """FedBuff's s(tau) = (1 + tau)^-a: 1 for an update trained from the newest version."""
    if staleness < 0:
        raise ValueError(f"Staleness counts versions published since an update's own: it is never negative. "
                         f"Received: staleness={staleness}")
    return float((1.0 + staleness) ** -exponent)


@dataclasses.dataclass(frozen=True)
class AsyncPolicy:
    """The rules of asynchronous rounds.

    Args:
        buffer_size: K, the updates that make a version; None: half the workers that train at once, at least 1.
        staleness_exponent: a in s(tau) = (1 + tau)^-a; 0 weighs every update alike.
        max_staleness: the stalest update taken, in versions; staler ones are refused as stale.
    """

    buffer_size: int | None = None
    staleness_exponent: float = 0.5
    max_staleness: int = DEFAULT_MAX_STALENESS

    def __post_init__(self) -> None:
        if self.buffer_size is not None and self.buffer_size < 1:
            raise ValueError(f"buffer_size must be positive. Received: buffer_size={self.buffer_size!r}")
        if not self.staleness_exponent >= 0:
            raise ValueError(f"staleness_exponent must be 0 or more. Received: "
                             f"staleness_exponent={self.staleness_exponent!r}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be 0 or more. Received: max_staleness={self.max_staleness!r}")

    def buffer(self, training: int) -> int:
        """K: the updates that make the next version, with this many workers training at once."""
        return self.buffer_size or max(1, training // 2)

    def weight(self, staleness: int) -> float:
        return staleness_weight(staleness, self.staleness_exponent)


class UpdateIds:
    """The last update id taken from each task index: those in the buffer, and those in published versions."""

    def __init__(self) -> None:
        self._buffered: dict[int, bytes] = {}
        self._published: dict[int, bytes] = {}

    def seen(self, task_index: int, update_id: bytes) -> bool:
        """Whether this update was taken already: a retry whose receipt was lost."""
        return update_id in (self._buffered.get(task_index), self._published.get(task_index))

    def take(self, task_index: int, update_id: bytes) -> None:
        self._buffered[task_index] = update_id

    def publish(self) -> None:
        """The buffer's updates are in the version being saved."""
        self._published.update(self._buffered)
        self._buffered.clear()

    def state(self) -> dict[str, np.ndarray]:
        """The ids of published updates, by checkpoint key (under :data:`STATE_PREFIX`)."""
        tasks = sorted(self._published)
        ids = np.frombuffer(b"".join(self._published[t] for t in tasks), np.uint8).reshape(len(tasks),
                                                                                           UPDATE_ID_BYTES)
        return {STATE_PREFIX + "tasks": np.array(tasks, np.int64), STATE_PREFIX + "update_ids": ids}

    def restore(self, saved: Mapping[str, np.ndarray]) -> None:
        """Takes the ids saved in a checkpoint; the buffer starts empty."""
        tasks, ids = saved.get(STATE_PREFIX + "tasks"), saved.get(STATE_PREFIX + "update_ids")
        self._buffered.clear()
        self._published.clear()
        if tasks is None or ids is None:
            return
        if tasks.ndim != 1 or ids.shape != (len(tasks), UPDATE_ID_BYTES):
            raise ValueError(f"The checkpoint's update ids are malformed: {len(tasks)} tasks and ids of shape "
                             f"{ids.shape}.")
        self._published = {int(t): bytes(i) for t, i in zip(tasks, ids.astype(np.uint8), strict=True)}
