"""Aggregation that a few poisoned updates cannot derail.

With federated averaging (McMahan et al. 2017) one worker that sends
scaled or random weights moves the global model as far as it likes. Two
defences, opt-in on the ps:

* **Coordinate-wise median and trimmed mean** (Yin et al. 2018,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
  Rates"): each weight of the new global model is the median of the
  updates' values for it, or their mean after dropping the
  ``floor(trim_fraction * n)`` largest and smallest. Both are unweighted:
  the number of examples is the worker's own claim, so weighting by it
  would let a poisoned worker buy the majority. Both need every update of a
  round at once, so the ps holds O(model x updates) memory for them, unlike
  the streamed mean (ARCHITECTURE.md, decision 5, which stays the default).
* **Bounding the norm of each update's change** from the global model
  (Sun et al. 2019, "Can You Really Backdoor Federated Learning?"): a
  longer change is scaled down to the bound. Clipping rather than
  rejecting: an honest worker whose change is large (early rounds, a high
  learning rate) still counts, in its own direction, and the round keeps
  its quorum; a poisoned one moves the mean by at most ``bound / n``. It
  works with every rule, streamed mean included.

The math is pure functions over NumPy arrays; :class:`AggregationPolicy`
holds the settings and starts each round's aggregate for the ps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from comind.aggregation import BLOCK_ELEMENTS, RunningWeightedSum, accumulator_dtype
from comind.tensors import Layout

log = logging.getLogger(__name__)

RULES = ("mean", "median", "trimmed-mean")

#: The fewest updates a round needs for a median to outvote one bad update.
MIN_MEDIAN_UPDATES = 3

Tensors = Sequence[np.ndarray]


def check_trim_fraction(trim_fraction: float) -> None:
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be at least 0 and below 0.5 (0.5 would drop every update from one "
                         f"end or the other). Received: trim_fraction={trim_fraction!r}")


def trim_count(num_updates: int, trim_fraction: float) -> int:
    """Updates dropped from each end of every coordinate: ``floor(trim_fraction * num_updates)``."""
    check_trim_fraction(trim_fraction)
    return math.floor(trim_fraction * num_updates)


def min_updates_to_trim(trim_fraction: float) -> int:
    """The fewest updates from which ``trim_fraction`` (positive) trims one at each end."""
    count = math.ceil(1 / trim_fraction)
    while not trim_count(count, trim_fraction):  # 1 / f can round below the exact count
        count += 1
    return count


def coordinate_median(updates: Sequence[Tensors], out: Tensors | None = None) -> list[np.ndarray]:
    """The median of each weight over the updates (the mean of the middle two for an even count).

    Args:
        updates: models with the same tensor shapes and dtypes.
        out: tensors to write the result into; by default new ones.

    Returns:
        The median model; integer tensors are rounded to the nearest integer.
    """
    return _middle_mean(updates, (len(updates) - 1) // 2, out)


def trimmed_mean(updates: Sequence[Tensors], trim_fraction: float, out: Tensors | None = None) -> list[np.ndarray]:
    """The mean of each weight over the updates, without its ``trim_count`` largest and smallest values.

    With too few updates to trim any (``trim_fraction * len(updates) < 1``)
    this is the plain unweighted mean; :meth:`HeldUpdates.result` takes the
    median instead.
    """
    return _middle_mean(updates, trim_count(len(updates), trim_fraction), out)


def _middle_mean(updates: Sequence[Tensors], trim: int, out: Tensors | None) -> list[np.ndarray]:
    """Per weight, the mean of the sorted values ``trim`` to ``n - trim``: the median is the most trimmed mean."""
    if not updates:
        raise ValueError("No update was given, so there is nothing to aggregate.")
    count = len(updates)
    out = [np.empty_like(t) for t in updates[0]] if out is None else list(out)
    # A block of every update's values, sorted across the updates: the rows
    # fit in cache, and peak memory stays one block, whatever the model.
    step = max(1, BLOCK_ELEMENTS // count)
    for index, result in enumerate(out):
        columns = [np.asarray(update[index]).reshape(-1) for update in updates]
        flat = result.reshape(-1)
        block = np.empty((count, min(step, flat.size)), accumulator_dtype(result.dtype))
        for start in range(0, flat.size, step):
            stop = min(start + step, flat.size)
            rows = block[:, : stop - start]
            for row, column in zip(rows, columns):
                np.copyto(row, column[start:stop], casting="unsafe")
            rows.sort(axis=0)  # for few updates, faster than np.partition or np.median
            middle = rows[trim: count - trim].mean(axis=0)
            np.copyto(flat[start:stop], middle if result.dtype.kind == "f" else np.rint(middle), casting="unsafe")
    return out


def delta_norm(update: Tensors, reference: Tensors) -> float:
    """The L2 norm of ``update - reference`` over the floating-point tensors.

    Integer tensors (step counters, random seeds) are left out: they are not
    learned, and a seed's change would dwarf every weight's.
    """
    total = 0.0
    for _, _, block in _float_blocks(update, reference):
        total += float(np.dot(block, block))
    return math.sqrt(total)


def clip_update(update: Tensors, reference: Tensors, max_norm: float) -> float:
    """Scales ``update - reference`` down, in place, to an L2 norm of ``max_norm`` if it is longer.

    Args:
        update: a model, changed in place.
        reference: the global model it was trained from.
        max_norm: the bound, positive.

    Returns:
        The norm of the change before clipping (see :func:`delta_norm`).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive. Received: max_norm={max_norm!r}")
    norm = delta_norm(update, reference)
    if norm > max_norm:
        scale = max_norm / norm
        for values, base, block in _float_blocks(update, reference):
            block *= scale
            block += base
            np.copyto(values, block, casting="same_kind")
    return norm


def _float_blocks(update: Tensors, reference: Tensors):
    """For each block of each floating-point tensor: its slice in ``update``, in ``reference``, and their
    difference in float64 (a scratch buffer, reused)."""
    scratch = np.empty(BLOCK_ELEMENTS, np.float64)
    for values, base in zip(update, reference):
        values, base = np.asarray(values).reshape(-1), np.asarray(base).reshape(-1)
        if values.dtype.kind != "f":
            continue
        for start in range(0, values.size, BLOCK_ELEMENTS):
            stop = min(start + BLOCK_ELEMENTS, values.size)
            block = scratch[: stop - start]
            np.subtract(values[start:stop], base[start:stop], out=block, dtype=np.float64)
            yield values[start:stop], base[start:stop], block


class RoundAggregate(Protocol):
    """What the ps folds a round's updates into: :class:`RunningWeightedSum` or :class:`HeldUpdates`."""

    count: int

    def add(self, tensors: Tensors, weight: float) -> None: ...

    def result(self) -> np.ndarray:
        """The new global model, packed in the layout; the aggregate is empty again."""


class HeldUpdates:
    """A round's updates, copied whole, for the median or the trimmed mean: O(model x updates) memory."""

    def __init__(self, layout: Layout, rule: str, trim_fraction: float):
        self.layout = layout
        self.rule = rule
        self.trim_fraction = trim_fraction
        self._updates: list[np.ndarray] = []

    @property
    def count(self) -> int:
        return len(self._updates)

    def add(self, tensors: Tensors, weight: float) -> None:
        """Keeps a copy of the update. ``weight`` plays no part: these rules count every update once."""
        packed = np.empty(self.layout.nbytes, np.uint8)
        for held, tensor in zip(self.layout.views(packed), tensors):
            np.copyto(held, tensor)
        self._updates.append(packed)

    def result(self) -> np.ndarray:
        packed = np.empty(self.layout.nbytes, np.uint8)
        updates, out = [self.layout.views(u) for u in self._updates], self.layout.views(packed)
        rule = self.rule
        if rule == "trimmed-mean" and self.trim_fraction and not trim_count(self.count, self.trim_fraction):
            # A round that closed short (at its deadline, or after workers left):
            # the median still outvotes a minority, the untrimmed mean would not.
            log.warning("This round has %d updates, too few to trim a fraction of %g from each end; taking "
                        "their coordinate-wise median instead.", self.count, self.trim_fraction)
            rule = "median"
        if rule == "median":
            coordinate_median(updates, out)
        else:
            trimmed_mean(updates, self.trim_fraction, out)
        self._updates = []
        return packed


@dataclasses.dataclass(frozen=True)
class AggregationPolicy:
    """How the ps combines a round's updates.

    Attributes:
        rule: ``mean`` (streamed, example-weighted as ``weighting`` says),
            ``median`` or ``trimmed-mean`` (unweighted, every update held).
        trim_fraction: for ``trimmed-mean``, the fraction of updates dropped
            from each end of every coordinate, from 0 up to 0.5.
        max_update_norm: bound on the L2 norm of each update's change from
            the global model (clipped to it), or None for no bound.
    """

    rule: str = "mean"
    trim_fraction: float = 0.25
    max_update_norm: float | None = None

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}. Received: rule={self.rule!r}")
        check_trim_fraction(self.trim_fraction)
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ValueError(f"max_update_norm must be positive, or None for no bound. "
                             f"Received: max_update_norm={self.max_update_norm!r}")

    def check_quorum(self, num_updates: int) -> None:
        """Raises ValueError if rounds of ``num_updates`` updates leave the rule nothing to outvote with."""
        where = "(COMIND_NUM_WORKERS or --workers, or COMIND_REPLICAS_TO_AGGREGATE if set)"
        if self.rule == "median" and num_updates < MIN_MEDIAN_UPDATES:
            raise ValueError(f"COMIND_AGGREGATION=median needs rounds of at least {MIN_MEDIAN_UPDATES} updates "
                             f"{where}: the median of {num_updates} is their mean. Received: num_updates={num_updates}")
        if self.rule == "trimmed-mean" and self.trim_fraction and not trim_count(num_updates, self.trim_fraction):
            # Rounded up, so that the fraction named does trim one.
            fraction = f", or raise COMIND_TRIM_FRACTION to {math.ceil(1000 / num_updates) / 1000:g}" \
                if num_updates >= MIN_MEDIAN_UPDATES else ""
            raise ValueError(f"COMIND_AGGREGATION=trimmed-mean with COMIND_TRIM_FRACTION={self.trim_fraction:g} "
                             f"trims nothing from rounds of {num_updates} updates (it drops floor(fraction x "
                             f"updates) from each end): it needs rounds of at least "
                             f"{min_updates_to_trim(self.trim_fraction)} updates {where}{fraction}. "
                             f"Received: num_updates={num_updates}, trim_fraction={self.trim_fraction!r}")

    def start(self, layout: Layout) -> RoundAggregate:
        """An empty aggregate for a new round."""
        if self.rule == "mean":
            return RunningWeightedSum(layout)
        return HeldUpdates(layout, self.rule, self.trim_fraction)
