"""How fast the ps takes registrations, and how often it says that it refused some.

A loop that registers thousands of times a second once froze rounds for a
lease and wrote a log line per registration. The ps takes registrations
from a :class:`TokenBucket`, refusing the excess with a retry hint, and
counts refusals in a metric, logging them through :class:`Summary`: a line
now and then rather than a line per refusal.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """``rate`` events a second on average, and bursts of up to ``burst`` at once.

    Args:
        rate: tokens added a second.
        burst: the most tokens held; the bucket starts full.
        clock: seconds, monotonic.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self._burst = burst
        self._tokens = burst
        self._clock = clock
        self._at = clock()

    def take(self) -> float:
        """Takes a token if there is one and returns 0; otherwise takes none and returns the seconds until
        there will be one."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


class Summary:
    """Says that something happened at most once every ``period`` seconds, with how often it did since."""

    def __init__(self, period: float, clock: Callable[[], float] = time.monotonic):
        self._period = period
        self._clock = clock
        self._next = -float("inf")
        self._count = 0

    def due(self) -> int:
        """Counts one occurrence; returns how many occurred since the last time this returned a count (this
        one included) when a line is due, else 0."""
        self._count += 1
        now = self._clock()
        if now < self._next:
            return 0
        count, self._count, self._next = self._count, 0, now + self._period
        return count
