"""The privacy ledger: every round's DP event, composed into epsilon at delta.

Each round of worker-level DP-FedAvg releases one noised sum: the event
``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, ``q`` the fraction of the
population the round sampled (1 while every live worker takes part in every
round) and ``z`` the noise multiplier. The ledger counts rounds by their
``(q, z)``: composition is commutative, so that multiset is all there is to
know, it is what the checkpoint keeps (three small arrays, no pickle), and
epsilon is a pure function of it. A restarted ps rebuilds exactly the epsilon
it had, and a ledger only grows: epsilon never goes down.

The accounting is Google's ``dp-accounting`` (RDP by default, PLD as an
option), imported only when DP is on, so a ps without DP does not need it.

References: Mironov 2017 (Renyi differential privacy); Mironov, Talwar and
Zhang 2019 (the sampled Gaussian mechanism); Koskela et al. 2020 and Doroshenko
et al. 2022 (privacy loss distributions).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import numpy as np

ACCOUNTANTS = ("rdp", "pld")

#: dp-accounting's default RDP orders (RdpAccountant's).
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])
#: PLD's discretisation: dp-accounting's default, a pessimistic estimate.
PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-4


def compose(events: Mapping[tuple[float, float], int], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of rounds composed: ``events`` maps ``(q, z)`` to how many rounds had it.

    Raises:
        ImportError: dp-accounting is not installed.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}. Received: accountant={accountant!r}")
    if not events:
        return 0.0
    if any(z <= 0 for _, z in events):
        return math.inf  # a round without noise releases the sum itself
    import dp_accounting
    from dp_accounting import pld, rdp

    if accountant == "rdp":
        # RDP composes by adding each event's curve over the orders: one curve per kind of round, scaled by its
        # count, summed in a fixed order, so the same events give the same epsilon to the bit, live or restored.
        total = sum(count * _rdp_curve(q, z) for (q, z), count in sorted(events.items()))
        return float(rdp.compute_epsilon(RDP_ORDERS, total, delta)[0])
    ledger = pld.PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL)
    for (q, z), rounds in sorted(events.items()):
        ledger.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return float(ledger.get_epsilon(delta))


@functools.cache
def _rdp_curve(q: float, z: float) -> np.ndarray:
    """The RDP of one round at each of :data:`RDP_ORDERS` (tens of ms to compute: kept)."""
    import dp_accounting
    from dp_accounting import rdp

    one = rdp.RdpAccountant(list(RDP_ORDERS))
    one.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    return np.asarray(one.rdp, np.float64)


class Ledger:
    """The rounds whose noised sums were released, and what they cost.

    Args:
        noise_multiplier: z, the noise's std over the clip (the whole mechanism's, adaptive clipping included).
        delta: the delta epsilon is given at.
        accountant: ``rdp`` or ``pld``.
    """

    def __init__(self, noise_multiplier: float, delta: float, accountant: str = "rdp"):
        if not 0 < delta < 1:
            raise ValueError(f"delta must be between 0 and 1. Received: delta={delta!r}")
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.accountant = accountant
        self.events: dict[tuple[float, float], int] = {}
        self.epsilon = 0.0
        try:  # now, not at the first round
            import dp_accounting  # noqa: F401
        except ImportError:
            raise ImportError("Differential privacy's accountant needs dp-accounting, which the image "
                              "has; elsewhere install it: pip install 'comind[dp]'.") from None

    @property
    def rounds(self) -> int:
        return sum(self.events.values())

    def record_round(self, sampled_fraction: float, count: int = 1, noise_multiplier: float | None = None) -> float:
        """Spends ``count`` rounds (or DP-SGD steps) that each sampled ``sampled_fraction`` (q) of the population;
        returns epsilon after them.

        Args:
            noise_multiplier: the z these rounds had, if not the ledger's (distributed noise with dropouts).
        """
        key = self._key(sampled_fraction, noise_multiplier)
        self.events[key] = self.events.get(key, 0) + count
        self.epsilon = compose(self.events, self.delta, self.accountant)
        return self.epsilon

    def epsilon_after(self, sampled_fraction: float) -> float:
        """Epsilon if one more round sampled ``sampled_fraction``; the ledger does not change."""
        key = self._key(sampled_fraction)
        return compose({**self.events, key: self.events.get(key, 0) + 1}, self.delta, self.accountant)

    def _key(self, sampled_fraction: float, noise_multiplier: float | None = None) -> tuple[float, float]:
        if not 0 < sampled_fraction <= 1:
            raise ValueError(f"A round samples a fraction of the population in (0, 1]. "
                             f"Received: sampled_fraction={sampled_fraction!r}")
        z = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        return float(sampled_fraction), float(z)

    def state(self) -> dict[str, np.ndarray]:
        keys = sorted(self.events)
        return {"sampled_fraction": np.array([q for q, _ in keys], np.float64),
                "noise_multiplier": np.array([z for _, z in keys], np.float64),
                "rounds": np.array([self.events[k] for k in keys], np.int64)}

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        """Takes a saved ledger back, events and all (even those of another noise multiplier: spent is spent)."""
        arrays = [np.asarray(state[name]) for name in ("sampled_fraction", "noise_multiplier", "rounds")]
        if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1 or arrays[2].dtype.kind not in "iu":
            raise ValueError(f"The checkpoint's privacy ledger is malformed: three equal-length lists expected. "
                             f"Received: shapes {[a.shape for a in arrays]}")
        self.events = {(float(q), float(z)): int(n) for q, z, n in zip(*arrays, strict=True)}
        self.epsilon = compose(self.events, self.delta, self.accountant)
