"""Secure aggregation's stages in a worker's Round call, on the ps: the wire side of ``secure_rounds.py``.

The call goes (``comind.proto``, ``SecAggParameters``): the hello with the update's header and the worker's keys;
the roster down; the worker's sealed shares up; its inbox down; its masked input up as the update's bytes; the
unmask request down; its revealed shares up; then its receipt, and the model as in any round. Renewals may come
at any point: they keep the worker's lease while it waits for the other parties.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np

from comind import refusals, tensors
from comind.proto import comind_pb2 as pb
from comind.ps import UpdateHeader, UpdateResult
from comind.secagg import fixed_point
from comind.secagg import wire as secagg_wire
from comind.secagg.stages import Stage
from comind.secure_rounds import Attempt, Contribution
from comind.tensors import Layout, TensorSpec

if TYPE_CHECKING:
    from comind.ps import ParameterServer

T = TypeVar("T")

#: Messages read ahead of the stage that takes them: a masked input's chunks beyond these stay in gRPC's flow
#: control, on the worker, while the ps waits for a receive slot or for the stage.
QUEUED_MESSAGES = 4


class Inbound:
    """A secure round call's messages from the worker: renewals renew its lease as they come; the others wait in
    order, a few at most (:data:`QUEUED_MESSAGES`), for the stage that reads them. :attr:`task` ends when the
    call's messages do, or with the refusal that ended it."""

    def __init__(self, next_message: Callable[[], Awaitable[pb.WorkerMessage | None]], renew: Callable[[], None]):
        self._queue: asyncio.Queue[pb.WorkerMessage] = asyncio.Queue(QUEUED_MESSAGES)
        self.task = asyncio.ensure_future(self._read(next_message, renew))

    async def _read(self, next_message: Callable[[], Awaitable[pb.WorkerMessage | None]],
                    renew: Callable[[], None]) -> None:
        while (message := await next_message()) is not None:
            if message.HasField("hello"):
                raise refusals.InvalidRequest("A Round call carries one hello. Received: a second one")
            if message.renewal:
                renew()
            else:
                await self._queue.put(message)  # a full queue stops the reading: the worker's sends wait

    async def next(self, what: str) -> pb.WorkerMessage:
        """The worker's next message other than a renewal. Raises InvalidRequest if the call ended first."""
        while self._queue.empty() and not self.task.done():
            getter = asyncio.ensure_future(self._queue.get())
            await asyncio.wait({getter, self.task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                return getter.result()
            getter.cancel()  # a cancelled get takes nothing from the queue
        if not self._queue.empty():
            return self._queue.get_nowait()
        self._raise_if_refused()
        raise refusals.InvalidRequest(f"The worker's call ended before its {what}.")

    async def until(self, work: Awaitable[T]) -> T:
        """``work``'s result, unless the worker's messages end first (its call is over): then raises why."""
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait({task, self.task}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                self._raise_if_refused()
                raise refusals.InvalidRequest("The worker's call ended while it waited for the other parties.")
            return task.result()
        finally:
            task.cancel()

    def _raise_if_refused(self) -> None:
        if self.task.done() and not self.task.cancelled():
            self.task.result()


async def exchange(ps: ParameterServer, hello: pb.Hello, header: UpdateHeader, next_message: Callable[[], Awaitable[
        pb.WorkerMessage | None]], context: grpc.aio.ServicerContext,
                   peer: bytes | None) -> tuple[UpdateResult, asyncio.Future[None]]:
    """Runs a worker's part in secure aggregation's stages, up to its receipt.

    Returns:
        What became of its update, and what reads the rest of the call: renewals, until the worker's model has gone
        down.

    Raises:
        Refusal: a message that breaks the protocol, or RoundFailed: the attempt failed for lack of survivors.
    """
    secure = ps.secure
    if secure is None:
        raise refusals.InvalidRequest("This ps does not aggregate securely: send the update as it is (run the same "
                                      "coMind version on the ps and the workers).")
    member_id = hello.member_id
    ps.renew(member_id, peer)
    metrics = ps.metrics.secagg_bytes
    result = ps.check_update(member_id, header)
    if result is not None:
        ps.metrics.updates.labels(result.value).inc()
        return result, Inbound(next_message, lambda: ps.renew(member_id, peer)).task
    party = ps.rounds.members[member_id].task_index
    attempt = secure.advertise(header.layout, member_id, party, Contribution(
        header.num_examples, header.loss, header.accuracy, header.federated_eval),
        secagg_wire.advertisement(header.round, party, hello.secagg_keys))
    metrics.labels("advertise").inc(hello.secagg_keys.ByteSize())
    inbound = Inbound(next_message, lambda: ps.renew(member_id, peer))
    finished = False
    try:
        await ps.maybe_close()  # the last party's keys close the first stage
        await _stage(inbound, context, attempt, Stage.SHARE, metrics.labels("advertise"), lambda: pb.PsMessage(
            secagg_roster=secagg_wire.roster_to_proto(attempt.roster())))
        shares = (await inbound.next("shares")).secagg_shares
        metrics.labels("share").inc(shares.ByteSize())
        await secure.share(attempt, party, secagg_wire.shares(shares))
        await ps.maybe_close()
        await _stage(inbound, context, attempt, Stage.MASKED_INPUT, metrics.labels("share"), lambda: pb.PsMessage(
            secagg_inbox=secagg_wire.shares_to_proto(attempt.inboxes.get(party, []))))
        # In a receive slot, as a plain update: a few masked inputs at a time are held; the others wait on the
        # workers (the queue is bounded), so that 64 workers of 10 MB do not land as 640 MB at once. Taken once
        # the input's first bytes are in, not while the worker computes its masks: that would serialize them.
        first = await inbound.next("masked input")
        async with ps.receive_slot(attempt.server.size * fixed_point.RING_DTYPE.itemsize) as deadline:
            async with asyncio.timeout_at(deadline):
                masked = await _masked_input(inbound, attempt, first)
            metrics.labels("masked_input").inc(masked.nbytes)
            await secure.masked_input(attempt, party, masked)
        await ps.maybe_close()
        await _stage(inbound, context, attempt, Stage.UNMASK, metrics.labels("unmask"), lambda: pb.PsMessage(
            secagg_unmask=secagg_wire.unmask_to_proto(attempt.request())))
        reveal = (await inbound.next("unmask shares")).secagg_reveal
        metrics.labels("unmask").inc(reveal.ByteSize())
        await secure.unmask(attempt, secagg_wire.reveal(party, reveal))
        await ps.maybe_close()
        await inbound.until(attempt.reached(Stage.DONE))
        finished = True
    except BaseException:
        inbound.task.cancel()
        raise
    finally:
        if not finished:
            with contextlib.suppress(Exception):
                await secure.call_ended(attempt, party)
                await ps.maybe_close()
    return UpdateResult.ACCEPTED, inbound.task


async def _stage(inbound: Inbound, context: grpc.aio.ServicerContext, attempt: Attempt, stage: Stage,
                 counter: Any, message: Callable[[], pb.PsMessage]) -> None:
    """Waits for the protocol to reach ``stage``, then sends the worker what it needs for it."""
    await inbound.until(attempt.reached(stage))
    reply = message()
    counter.inc(reply.ByteSize())
    await context.write(reply.SerializeToString())


async def _masked_input(inbound: Inbound, attempt: Attempt, message: pb.WorkerMessage) -> np.ndarray:
    """The worker's masked input: the update's bytes, from ``message``, its first, up to the message that says
    end."""
    size = attempt.server.size
    assembler = tensors.Assembler(Layout([TensorSpec("masked input", fixed_point.RING_DTYPE, (size,))]))
    try:
        while True:
            if message.HasField("secagg_shares") or message.HasField("secagg_reveal"):
                raise refusals.InvalidRequest("The masked input must come next, as the update's bytes.")
            assembler.feed(message.data)
            if message.end:
                return assembler.finish().view(fixed_point.RING_DTYPE)
            message = await inbound.next("masked input")
    except tensors.TruncatedStream as error:
        raise refusals.TruncatedStream(f"Truncated masked input: the {error}.") from None
    except tensors.OversizedStream as error:
        raise refusals.OversizedStream(f"Oversized masked input: the {error}.") from None
