"""The aggregator stage: how a round's updates become one aggregate update.

* ``mean``: the weighted mean, streamed (``aggregation.py``): O(model)
  memory however many workers push.
* ``median`` and ``trimmed-mean``: coordinate-wise and unweighted
  (``robust.py``); they hold every update of a round, O(model x updates).

Each choice checks, before the ps starts, that its rounds will have enough
updates for it to mean anything.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from comind import robust
from comind.aggregation import RunningWeightedSum
from comind.registry import Registry
from comind.tensors import Layout

log = logging.getLogger(__name__)

Tensors = Sequence[np.ndarray]

#: Where a too-small quorum comes from, for the errors below.
_QUORUM_SETTINGS = ("(COMIND_NUM_WORKERS or --workers, or COMIND_REPLICAS_TO_AGGREGATE if set; with asynchronous "
                    "rounds, COMIND_BUFFER_SIZE)")


class RoundAggregate(Protocol):
    """A round's updates so far."""

    @property
    def count(self) -> int: ...

    def add(self, update: Tensors, weight: float) -> None: ...

    def result(self) -> np.ndarray:
        """The aggregate update, packed in the layout."""


class Aggregator(Protocol):
    #: Whether the ps holds every update of a round (O(model x updates) memory).
    holds_updates: bool

    def check_quorum(self, num_updates: int) -> None:
        """Raises ValueError if rounds of ``num_updates`` updates leave the rule nothing to outvote with."""

    def start(self, layout: Layout) -> RoundAggregate:
        """An empty aggregate for a new round."""


@dataclasses.dataclass(frozen=True)
class AggregatorSettings:
    trim_fraction: float = 0.25


AGGREGATORS: Registry[Callable[[AggregatorSettings], Aggregator]] = Registry("COMIND_AGGREGATION")


@AGGREGATORS.register("mean")
class Mean:
    """The weighted mean, streamed into one running sum."""

    holds_updates = False

    def __init__(self, settings: AggregatorSettings):
        pass

    def check_quorum(self, num_updates: int) -> None:
        pass  # a mean of any number of updates is a mean

    def start(self, layout: Layout) -> RoundAggregate:
        return RunningWeightedSum(layout)


class _HeldUpdates:
    """A round's updates, copied whole, reduced coordinate-wise by ``reduce`` at the end."""

    def __init__(self, layout: Layout, reduce: Callable[[list[Tensors], Tensors], object]):
        self.layout = layout
        self._reduce = reduce
        self._updates: list[np.ndarray] = []

    @property
    def count(self) -> int:
        return len(self._updates)

    def add(self, update: Tensors, weight: float) -> None:
        """Keeps a copy of the update. ``weight`` plays no part: these rules count every update once."""
        packed = np.empty(self.layout.nbytes, np.uint8)
        for held, tensor in zip(self.layout.views(packed), update, strict=True):
            np.copyto(held, tensor)
        self._updates.append(packed)

    def result(self) -> np.ndarray:
        packed = np.empty(self.layout.nbytes, np.uint8)
        self._reduce([self.layout.views(u) for u in self._updates], self.layout.views(packed))
        return packed


@AGGREGATORS.register("median")
class Median:
    """The coordinate-wise median (Yin et al. 2018)."""

    holds_updates = True

    def __init__(self, settings: AggregatorSettings):
        pass

    def check_quorum(self, num_updates: int) -> None:
        if num_updates < robust.MIN_MEDIAN_UPDATES:
            raise ValueError(f"COMIND_AGGREGATION=median needs rounds of at least {robust.MIN_MEDIAN_UPDATES} "
                             f"updates {_QUORUM_SETTINGS}: the median of {num_updates} is their mean. "
                             f"Received: num_updates={num_updates}")

    def start(self, layout: Layout) -> RoundAggregate:
        return _HeldUpdates(layout, robust.coordinate_median)


@AGGREGATORS.register("trimmed-mean")
class TrimmedMean:
    """The coordinate-wise mean without the ``floor(trim_fraction x updates)`` largest and smallest values."""

    holds_updates = True

    def __init__(self, settings: AggregatorSettings):
        robust.check_trim_fraction(settings.trim_fraction)
        self.trim_fraction = settings.trim_fraction

    def check_quorum(self, num_updates: int) -> None:
        if not self.trim_fraction or robust.trim_count(num_updates, self.trim_fraction):
            return
        # Rounded up, so that the fraction named does trim one.
        fraction = f", or raise COMIND_TRIM_FRACTION to {math.ceil(1000 / num_updates) / 1000:g}" \
            if num_updates >= robust.MIN_MEDIAN_UPDATES else ""
        raise ValueError(f"COMIND_AGGREGATION=trimmed-mean with COMIND_TRIM_FRACTION={self.trim_fraction:g} "
                         f"trims nothing from rounds of {num_updates} updates (it drops floor(fraction x "
                         f"updates) from each end): it needs rounds of at least "
                         f"{robust.min_updates_to_trim(self.trim_fraction)} updates {_QUORUM_SETTINGS}{fraction}. "
                         f"Received: num_updates={num_updates}, trim_fraction={self.trim_fraction!r}")

    def start(self, layout: Layout) -> RoundAggregate:
        return _HeldUpdates(layout, self._reduce)

    def _reduce(self, updates: list[Tensors], out: Tensors) -> None:
        if self.trim_fraction and not robust.trim_count(len(updates), self.trim_fraction):
            # A round that closed short (at its deadline, or after workers left):
            # the median still outvotes a minority, the untrimmed mean would not.
            log.warning("This round has %d updates, too few to trim a fraction of %g from each end; taking "
                        "their coordinate-wise median instead.", len(updates), self.trim_fraction)
            robust.coordinate_median(updates, out)
        else:
            robust.trimmed_mean(updates, self.trim_fraction, out)
