"""What moving models costs the ps, bounded: how many at once, how long, which buffers.

Each model being received holds a model-sized buffer, and each being sent
holds gRPC's send buffers, so both are limited to a few at a time; a peer
that trickles bytes must not hold a slot for ever, so waiting for a slot and
the transfer itself share one deadline, sized from the model
(:func:`comind.protocol.transfer_seconds`, which workers allow for too).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import numpy as np

from comind.protocol import MIN_BYTES_PER_SECOND, transfer_seconds
from comind.refusals import Busy, TooSlow


class Slots:
    """A few transfers at a time, each finished by its deadline."""

    def __init__(self, count: int, what: str):
        self._semaphore = asyncio.Semaphore(count)
        self._what = what

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[float]:
        """Holds a slot, waiting for it at most until the deadline; yields the deadline.

        The caller bounds its transfer with ``asyncio.timeout_at(deadline)``
        and may go on using what it received after that, still in the slot.

        Raises:
            Busy: no slot came free in time.
            TooSlow: the transfer passed the deadline.
        """
        seconds = transfer_seconds(nbytes)
        deadline = asyncio.get_running_loop().time() + seconds
        try:
            # A free slot is taken at once: no timer for it (thousands of calls a round).
            async with asyncio.timeout_at(deadline if self._semaphore.locked() else None):
                await self._semaphore.acquire()
        except TimeoutError:
            raise Busy(f"The ps was busy {self._what} other models for {seconds:.0f} s; retry.") from None
        try:
            yield deadline
        except TimeoutError:
            raise TooSlow(f"{self._what.capitalize()} the model took over {seconds:.0f} s (at least "
                          f"{MIN_BYTES_PER_SECOND / 1e6:.0f} MB/s is expected).") from None
        finally:
            self._semaphore.release()


class BufferPool:
    """Receive buffers kept for reuse: a fresh model-sized buffer per update costs
    page faults that make receiving about half as fast."""

    def __init__(self, keep: int):
        self._free: list[np.ndarray] = []
        self._keep = keep

    def take(self, nbytes: int) -> np.ndarray:
        for i, buffer in enumerate(self._free):
            if buffer.nbytes == nbytes:
                return self._free.pop(i)
        return np.empty(nbytes, dtype=np.uint8)

    def give_back(self, buffer: np.ndarray) -> None:
        if len(self._free) < self._keep:
            self._free.append(buffer)
