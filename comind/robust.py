"""Aggregation that a few poisoned updates cannot derail.

With federated averaging (McMahan et al. 2017) one worker that sends
scaled or random weights moves the global model as far as it likes. Two
defences, opt-in on the ps:

* **Coordinate-wise median and trimmed mean** (Yin et al. 2018,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
  Rates"): each coordinate of a round's aggregate is the median of the
  updates' values for it, or their mean after dropping the
  ``floor(trim_fraction * n)`` largest and smallest. Both are unweighted:
  the number of examples is the worker's own claim, so weighting by it
  would let a poisoned worker buy the majority. Both need every update of a
  round at once, so the ps holds O(model x updates) memory for them, unlike
  the streamed mean (docs/design.md, decision 5, which stays the default).
* **Bounding the norm of each update** (its change from the global model,
  Sun et al. 2019, "Can You Really Backdoor Federated Learning?"): a
  longer change is scaled down to the bound. Clipping rather than
  rejecting: an honest worker whose change is large (early rounds, a high
  learning rate) still counts, in its own direction, and the round keeps
  its quorum; a poisoned one moves the mean by at most ``bound / n``. It
  works with every rule, streamed mean included.

The math is pure functions over NumPy arrays; ``aggregators.py`` and
``clipping.py`` make stages of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from comind.aggregation import BLOCK_ELEMENTS, accumulator_dtype

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
    this is the plain unweighted mean; the ``trimmed-mean`` aggregator takes
    the median instead.
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
            for row, column in zip(rows, columns, strict=True):
                np.copyto(row, column[start:stop], casting="unsafe")
            rows.sort(axis=0)  # for few updates, faster than np.partition or np.median
            middle = rows[trim: count - trim].mean(axis=0)
            np.copyto(flat[start:stop], middle if result.dtype.kind == "f" else np.rint(middle), casting="unsafe")
    return out


def update_norm(update: Tensors) -> float:
    """The L2 norm of an update over its floating-point tensors (the change from the global model).

    Integer tensors (step counters, random seeds) travel as values, not
    changes, and are left out: they are not learned.
    """
    total = 0.0
    for _, block in _float_blocks(update):
        total += float(np.dot(block, block))
    return math.sqrt(total)


def clip_update(update: Tensors, max_norm: float) -> float:
    """Scales an update's floating-point tensors down, in place, to an L2 norm of ``max_norm`` if it is longer.

    Args:
        update: a change from the global model, changed in place.
        max_norm: the bound, positive.

    Returns:
        The norm before clipping (see :func:`update_norm`).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive. Received: max_norm={max_norm!r}")
    norm = update_norm(update)
    if norm > max_norm:
        scale = max_norm / norm
        for values, block in _float_blocks(update):
            block *= scale
            np.copyto(values, block, casting="same_kind")
    return norm


def _float_blocks(update: Tensors) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """For each block of each floating-point tensor: its slice in ``update``, and a float64 copy of it
    (a scratch buffer, reused)."""
    scratch = np.empty(BLOCK_ELEMENTS, np.float64)
    for tensor in update:
        values = np.asarray(tensor).reshape(-1)
        if values.dtype.kind != "f":
            continue
        for start in range(0, values.size, BLOCK_ELEMENTS):
            stop = min(start + BLOCK_ELEMENTS, values.size)
            block = scratch[: stop - start]
            np.copyto(block, values[start:stop])
            yield values[start:stop], block
