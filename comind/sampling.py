"""Client sampling: which live workers train in a round (docs/design.md, decision 15).

Each round the ps draws ``k`` of its live workers uniformly at random,
without replacement, as cross-device federated learning does (McMahan et al.
2017, the fraction C; Bonawitz et al. 2019, over-selection). With
worker-level differential privacy it draws a Poisson sample instead: each
live worker independently with a probability ``q`` fixed for the run, the
sampling DP-FedAvg's accountant counts on (McMahan et al. 2018). Either draw
is reproducible from what the ps logs: the round's seed (128 bits from the
operating system's CSPRNG, :mod:`secrets`), the task indices of the live
workers, and ``k`` or ``q``. An auditor calls :func:`select` or
:func:`select_poisson` with them::

    select(range(20), 5, 0x3f2a...)                # the task indices the round's line names
    select_poisson(range(20), 0.25, 0x3f2a...)     # q as the line writes it

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
    _check_ascending(members_sorted)
    if k < 0:
        raise ValueError(f"k must be at least 0. Received: k={k}")
    if k >= len(members_sorted):
        return list(members_sorted)
    generator = np.random.Generator(np.random.PCG64(seed))
    picked = generator.choice(len(members_sorted), size=k, replace=False)
    return sorted(members_sorted[int(i)] for i in picked)


def select_poisson(members_sorted: Sequence[int], q: float, seed: int) -> list[int]:
    """The members a Poisson draw with this seed selects: each independently with probability ``q``, ascending.

    Args:
        members_sorted: the task indices of the live workers when the round drew, ascending (as logged).
        q: each member's probability of being selected, as logged (its ``repr``: the comparison below is exact).
        seed: the round's seed, as logged.

    Returns:
        The selected task indices, ascending; possibly none (with probability ``(1 - q) ** len(members_sorted)``).

    The draw is ``Generator(PCG64(seed)).random(len(members_sorted)) < q``: member ``i`` is selected when the
    ``i``-th uniform of the round's stream is below ``q``.
    """
    _check_ascending(members_sorted)
    if not 0 < q <= 1:
        raise ValueError(f"q must be more than 0 and at most 1. Received: q={q!r}")
    uniforms = np.random.Generator(np.random.PCG64(seed)).random(len(members_sorted))
    return [member for member, u in zip(members_sorted, uniforms, strict=True) if u < q]


def _check_ascending(members_sorted: Sequence[int]) -> None:
    if list(members_sorted) != sorted(members_sorted):
        raise ValueError(f"A draw takes the members in ascending order, as the ps logs them. "
                         f"Received: members_sorted={list(members_sorted)[:10]}...")


@dataclasses.dataclass(frozen=True)
class SamplingPolicy:
    """How many live workers each round selects.

    Args:
        clients_per_round: K, the updates a round needs; None: every live worker (no sampling).
        client_fraction: K as a fraction of the live workers (rounded down, at least 1), instead of a number.
        over_selection: x: each round selects ``ceil(K (1 + x))`` and closes at K updates, so that workers
            that are slow or gone cost no round.
        poisson_rate: q: each round selects each live worker independently with this probability instead
            (Poisson sampling, for worker-level DP: :meth:`poisson`); None: ``size()`` of them, uniformly.
    """

    clients_per_round: int | None = None
    client_fraction: float | None = None
    over_selection: float = 0.0
    poisson_rate: float | None = None

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
        if self.poisson_rate is None:
            return
        if not (self.enabled and 0 < self.poisson_rate <= 1):
            raise ValueError(f"Poisson sampling's rate is a probability in (0, 1], with client sampling on. "
                             f"Received: poisson_rate={self.poisson_rate!r}, enabled={self.enabled}")
        if self.over_selection:
            raise ValueError(f"With worker-level differential privacy, client sampling draws a Poisson sample, each "
                             f"live worker with probability q, and takes every selected worker's update: there is "
                             f"no K to select more than. Unset --over-selection. "
                             f"Received: over_selection={self.over_selection}")

    def poisson(self, num_workers: int) -> SamplingPolicy:
        """This policy drawing Poisson samples, q fixed for the run: the client fraction F if given, else
        K / ``num_workers`` (at most 1)."""
        if self.clients_per_round is None:
            assert self.client_fraction is not None, "Poisson sampling needs client sampling on"
            return dataclasses.replace(self, poisson_rate=self.client_fraction)
        return dataclasses.replace(self, poisson_rate=min(1.0, self.clients_per_round / num_workers))

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
    #: q, for a Poisson draw (:func:`select_poisson`); None for one of fixed size (:func:`select`).
    poisson_rate: float | None = None

    @classmethod
    def draw(cls, round: int, population: Iterable[int], size: int, seed: int) -> Selection:
        """Selects ``size`` of ``population`` (task indices, in any order) with ``seed``."""
        members = tuple(sorted(population))
        return cls(round, seed, members, frozenset(select(members, size, seed)))

    @classmethod
    def draw_poisson(cls, round: int, population: Iterable[int], q: float, seed: int) -> Selection:
        """Selects each of ``population`` (task indices, in any order) with probability ``q``, with ``seed``."""
        members = tuple(sorted(population))
        return cls(round, seed, members, frozenset(select_poisson(members, q, seed)), q)

    def describe(self) -> str:
        """What the ps logs: enough to call :func:`select` (or :func:`select_poisson`) again and compare."""
        how = "" if self.poisson_rate is None else f"Poisson q {self.poisson_rate!r}, "
        return (f"seed {self.seed:#x}, {how}{len(self.selected)} of {len(self.population)} live (tasks "
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
