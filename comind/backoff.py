"""Jittered exponential backoff for calls to a ps that may be down."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Delays of "full jitter" backoff: uniform in [0, min(cap, base * 2**n)].

    Full jitter spreads the retries of many workers that lost the same ps at
    the same moment, so a restarted ps is not hit by all of them at once.
    """

    base: float = 0.05
    cap: float = 5.0

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        rng = rng or random.Random()
        attempt = 0
        while True:
            yield rng.uniform(0, min(self.cap, self.base * 2 ** attempt))
            attempt = min(attempt + 1, 62)
