"""What moving models costs the ps, bounded: how many at once, how long, which buffers.

Each model being received holds a model-sized buffer, and each being sent
holds gRPC's send buffers, so both are limited to a few at a time; a peer
that trickles bytes must not hold a slot for ever, so waiting for a slot and
the transfer itself share one deadline, sized from the model. Every worker
pulls the same model each round, so its messages are serialized once and
shared by all the pulls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator

import grpc
import numpy as np

from comind.proto import comind_pb2 as pb
from comind.ps import GlobalModel, Refusal
from comind.tensors import chunks

#: A transfer may take this long plus its size at the rate below.
MIN_SECONDS = 30.0
MIN_BYTES_PER_SECOND = 1e6

#: Models up to this size are serialized once per round for every pull; a
#: larger one, chunk by chunk for each pull, so that the ps never holds a
#: second copy of it.
SHARED_MESSAGES_MAX_BYTES = 64 << 20


def allowed_seconds(nbytes: int) -> float:
    return MIN_SECONDS + nbytes / MIN_BYTES_PER_SECOND


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
        """
        seconds = allowed_seconds(nbytes)
        deadline = asyncio.get_running_loop().time() + seconds
        try:
            async with asyncio.timeout_at(deadline):
                await self._semaphore.acquire()
        except TimeoutError:
            raise Refusal(grpc.StatusCode.UNAVAILABLE,
                          f"The ps was busy {self._what} other models for {seconds:.0f} s; retry.") from None
        try:
            yield deadline
        except TimeoutError:
            raise Refusal(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"{self._what.capitalize()} the model took over {seconds:.0f} s (at least "
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


class ModelMessages:
    """The PullModel replies that carry the newest global model, serialized.

    A thousand workers pull the same model in a round: serializing its
    messages once, not once per pull, saves two copies of the model per pull
    (slicing it into bytes, then serializing those), and the allocations that
    go with them. The server writes these bytes as they are (PullModel has no
    response serializer).
    """

    def __init__(self):
        self._model: GlobalModel | None = None
        self._messages: list[tuple[bytes, int]] = []

    def of(self, model: GlobalModel) -> Iterable[tuple[bytes, int]]:
        """Each reply message of ``model``, serialized, with the model bytes it carries."""
        if model.layout.nbytes > SHARED_MESSAGES_MAX_BYTES:
            return _serialize(model)
        if model is not self._model:
            self._model, self._messages = model, list(_serialize(model))
        return self._messages


def not_ready(round: int) -> bytes:
    """The reply to a pull that waited a whole long poll for a newer model."""
    return pb.ModelChunk(header=pb.ModelHeader(ready=False, round=round)).SerializeToString()


def _serialize(model: GlobalModel) -> Iterator[tuple[bytes, int]]:
    header = pb.ModelHeader(ready=True, round=model.round, done=model.done, tensors=model.layout.to_proto())
    yield pb.ModelChunk(header=header).SerializeToString(), 0
    for data in chunks(model.packed):
        yield pb.ModelChunk(data=data).SerializeToString(), len(data)
