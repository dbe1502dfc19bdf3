"""The ps's reading of a secure round call (``comind/secure_calls.py``): a few messages ahead at most, so that a
masked input waiting for its stage or its receive slot stays on the worker (gRPC flow control)."""

from __future__ import annotations

import asyncio

import pytest

from comind import refusals
from comind.proto import comind_pb2 as pb
from comind.secure_calls import QUEUED_MESSAGES, Inbound

CHUNK = pb.WorkerMessage(data=b"x" * 1000)


def test_the_reading_stops_a_few_messages_ahead_of_the_stage():
    async def main() -> None:
        read = 0

        async def next_message() -> pb.WorkerMessage:
            nonlocal read
            read += 1
            return CHUNK

        inbound = Inbound(next_message, lambda: None)
        await asyncio.sleep(0.05)
        assert read == QUEUED_MESSAGES + 1  # the queue's, and the one waiting to go in
        for _ in range(10):
            assert await inbound.next("masked input") == CHUNK
        await asyncio.sleep(0.05)
        assert read == 10 + QUEUED_MESSAGES + 1
        inbound.task.cancel()

    asyncio.run(main())


def test_messages_read_before_the_call_ended_are_taken_then_its_end_or_refusal_is_raised():
    async def main(last: pb.WorkerMessage | None, error: str) -> None:
        messages = iter([pb.WorkerMessage(renewal=True), CHUNK, CHUNK, last])
        renewals = []

        async def next_message() -> pb.WorkerMessage | None:
            return next(messages)

        inbound = Inbound(next_message, lambda: renewals.append(1))
        await asyncio.sleep(0.01)
        assert inbound.task.done() and renewals == [1]
        assert [await inbound.next("masked input") for _ in range(2)] == [CHUNK, CHUNK]
        with pytest.raises(refusals.InvalidRequest, match=error):
            await inbound.next("unmask shares")

    asyncio.run(main(None, "call ended before its unmask shares"))
    asyncio.run(main(pb.WorkerMessage(hello=pb.Hello()), "carries one hello"))
