"""Client sampling: which live workers train in a round (docs/design.md, decision 15).

Each round the ps draws ``k`` of its live workers uniformly at random,
without replacement, as cross-device federated learning does (McMahan et al.
2017, the fraction C; Bonawitz et al. 2019, over-selection). The draw is
reproducible from what the ps logs: the round's seed (128 bits from the
operating system's CSPRNG, :mod:`secrets`), the task indices of the live
workers, and ``k``. An auditor calls :func:`select` with them::

    select(range(20), 5, 0x3f2a...)  # the task indices the round's line names

Pure functions and a frozen policy: no clock, no I/O.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Iterable, Sequence

import numpy as np

#: Bits of each round's seed.
SEED_BITS = 128


def draw_seed() -> int:
    """A fresh seed from the operating system's CSPRNG: no one, the ps's operator included, can steer a draw."""
    return secrets.randbits(SEED_BITS)


def select(members_sorted: Sequence[int], k: int, seed: int) -> list[int]:
    """The ``k`` members a round with this seed selects, uniformly without replacement, in ascending order.

    Args:
        members_sorted: the task indices of the live workers when the round drew, ascending (as logged).
        k: how many to select; all of them when there are no more than ``k``.
        seed: the round's seed, as logged.

    Returns:
        The selected task indices, ascending.

    The draw is NumPy's ``Generator(PCG64(seed)).choice(len(members_sorted), k, replace=False)``, so it is
    reproducible with the NumPy version the ps ran (NumPy keeps a Generator's streams across versions unless
    its release notes say otherwise).
    """
    if list(members_sorted) != sorted(members_sorted):
        raise ValueError(f"select() takes the members in ascending order, as the ps logs them. "
                         f"Received: members_sorted={list(members_sorted)[:10]}...")
    if k < 0:
        raise ValueError(f"k must be at least 0. Received: k={k}")
    if k >= len(members_sorted):
        return list(members_sorted)
    generator = np.random.Generator(np.random.PCG64(seed))
    picked = generator.choice(len(members_sorted), size=k, replace=False)
    return sorted(members_sorted[int(i)] for i in picked)


@dataclasses.dataclass(frozen=True)
class SamplingPolicy:
    """How many live workers each round selects.

    Args:
        clients_per_round: K, the updates a round needs; None: every live worker (no sampling).
        client_fraction: K as a fraction of the live workers (rounded down, at least 1), instead of a number.
        over_selection: x: each round selects ``ceil(K (1 + x))`` and closes at K updates, so that workers
            that are slow or gone cost no round.
    """

    clients_per_round: int | None = None
    client_fraction: float | None = None
    over_selection: float = 0.0

    def __post_init__(self) -> None:
        if self.clients_per_round is not None and self.client_fraction is not None:
            raise ValueError(f"Set the clients per round or the client fraction, not both: they say the same. "
                             f"Received: clients_per_round={self.clients_per_round}, "
                             f"client_fraction={self.client_fraction}")
        if self.clients_per_round is not None and self.clients_per_round < 1:
            raise ValueError(f"clients_per_round must be at least 1. Received: "
                             f"clients_per_round={self.clients_per_round}")
        if self.client_fraction is not None and not 0 < self.client_fraction <= 1:
            raise ValueError(f"client_fraction must be more than 0 and at most 1. Received: "
                             f"client_fraction={self.client_fraction}")
        if not 0 <= self.over_selection < math.inf:
            raise ValueError(f"over_selection must be a finite number >= 0. Received: "
                             f"over_selection={self.over_selection}")
        if self.over_selection and not self.enabled:
            raise ValueError(f"Over-selection needs client sampling: set the clients per round or the client "
                             f"fraction as well. Received: over_selection={self.over_selection}")

    @property
    def enabled(self) -> bool:
        return self.clients_per_round is not None or self.client_fraction is not None

    def quorum(self, live: int) -> int:
        """K: the updates that close a round with ``live`` workers live (never more than ``live``, at least 1)."""
        if self.clients_per_round is not None:
            k = self.clients_per_round
        else:
            assert self.client_fraction is not None
            k = int(self.client_fraction * live + 1e-9)  # rounded down; 0.3 x 10 is 3.0000000000000004
        return max(1, min(k, live))

    def size(self, live: int) -> int:
        """How many a round selects: ``ceil(K (1 + x))``, at most every live worker."""
        return min(live, math.ceil(self.quorum(live) * (1 + self.over_selection) - 1e-9))


@dataclasses.dataclass(frozen=True)
class Selection:
    """One draw: the workers selected to train in ``round``, and what reproduces it."""

    round: int
    seed: int
    population: tuple[int, ...]  # the live workers' task indices, ascending
    selected: frozenset[int]

    @classmethod
    def draw(cls, round: int, population: Iterable[int], size: int, seed: int) -> Selection:
        """Selects ``size`` of ``population`` (task indices, in any order) with ``seed``."""
        members = tuple(sorted(population))
        return cls(round, seed, members, frozenset(select(members, size, seed)))

    def describe(self) -> str:
        """What the ps logs: enough to call :func:`select` again and compare."""
        return (f"seed {self.seed:#x}, {len(self.selected)} of {len(self.population)} live (tasks "
                f"{ranges(self.population)}): tasks {ranges(sorted(self.selected))}")


def ranges(numbers: Sequence[int]) -> str:
    """Ascending integers as ranges, ``0..7,9,11..19``: a population with few gaps is a short log line."""
    parts: list[str] = []
    start = previous = None
    for n in [*numbers, None]:
        if n is not None and previous is not None and n == previous + 1:
            previous = n
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}..{previous}")
        start = previous = n
    return ",".join(parts) or "none"


def parse_ranges(text: str) -> list[int]:
    """The integers of :func:`ranges`' text, for an auditor reading a log line."""
    if text == "none":
        return []
    numbers: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("..")
        numbers.extend(range(int(first), int(last or first) + 1))
    return numbers
