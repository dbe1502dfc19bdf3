"""Many simulated workers in one process: asyncio gRPC clients that speak the real protocol.

``WorkerClient`` spends a thread per worker; a load test needs hundreds of
workers per process, so each client here is a few coroutines instead. They
make the calls a ``WorkerClient`` makes, in its order and with its timeouts:
Join, then one Round call per round it is given a model for (the chief's first carries the initial
model; every later one a change, its end marker, then renewals every third of the lease
while it waits for the model), a Heartbeat every third of the lease while
no call is open, Leave. A client does no training: its update is a zero
change, encoded as the ps announced at Join, so every update is valid and finite, and the model stays the same.

Under client sampling (``--clients-per-round`` on the ps) a client's call
that waits for its next model is held by the ps until a round selects it
(renewals and long polls meanwhile, as a ``WorkerClient``'s): it then trains
for the round after the model it got, and goes on until the final model.

Each client has a channel and a TCP connection of its own, as workers on
separate machines would (gRPC would otherwise share one connection between
channels to the same address).

Run by ``bench/load.py``, one process per slice of the task indices:

    python bench/swarm.py --address HOST:PORT --tasks 0:250 --model-bytes 400000 --rounds 20

The token, if any, comes from ``COMIND_TOKEN``. With ``--hold-initial`` the
chief joins but gives the initial model only once a line arrives on stdin,
so that the parent can measure the ps with every other worker connected and
idle. When every client is done it
prints one JSON line (a :func:`run_client` report per client) and keeps its workers joined
until a line arrives on stdin, so the ps is still up when the parent reads
its figures; then they all leave.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import sys
import time

import grpc
import numpy as np

from comind import encodings
from comind.auth import call_metadata
from comind.backoff import Backoff
from comind.client import RETRYABLE, UNARY_TIMEOUT_SECONDS, renewal_due
from comind.proto import comind_pb2 as pb
from comind.proto import comind_pb2_grpc as pb_grpc
from comind.protocol import GRPC_OPTIONS, LONG_POLL_SECONDS, round_call_seconds
from comind.tensors import Assembler, Layout, chunks
from core import EXAMPLES, make_model

CHANNEL_OPTIONS = [*GRPC_OPTIONS, ("grpc.keepalive_time_ms", 30000), ("grpc.use_local_subchannel_pool", 1)]
RENEWAL = pb.WorkerMessage(renewal=True)
#: Join refusals a WorkerClient retries: the ps is busy, or takes registrations at a bounded rate.
JOIN_RETRIES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
MAX_JOIN_ATTEMPTS = 8
#: Clients of a process that connect and join at once: a population arrives over seconds, not in one
#: burst of thousands of connections that overflows the ps's listen backlog (the kernel then drops
#: connection attempts, and gRPC backs off for up to two minutes before it tries again).
JOINS_AT_ONCE = 32


class LoadError(RuntimeError):
    """The ps answered something a correct ps would not."""


@dataclasses.dataclass(frozen=True)
class Push:
    """An update as a client saw it, in ``time.monotonic()`` seconds (one clock for
    every process on the machine)."""

    round: int
    pushed: float    # the Round call started
    acked: float     # the ps's receipt for the update arrived


@dataclasses.dataclass(frozen=True)
class Received:
    """A global model the client received, and when it was complete."""

    round: int
    received: float


@dataclasses.dataclass
class Update:
    kind: int
    round: int
    layout: Layout
    data: list[pb.WorkerMessage]  # the update's bytes, as messages, the last saying end


def data_messages(packed: np.ndarray) -> list[pb.WorkerMessage]:
    """An update's bytes as WorkerClient sends them: the chunks, then the end.

    The end alone, though the ps takes it with the last chunk: gRPC holds a
    call's last message received until it reads the next, and a call then
    waits for its model, under client sampling for many seconds, so the
    last chunk would stay in the ps's memory (tests/test_load.py: 458 MB
    instead of 243 with 2,000 workers).
    """
    return [*(pb.WorkerMessage(data=data) for data in chunks(packed)), pb.WorkerMessage(end=True)]


@functools.cache
def zero_change(layout: Layout, encoding: str) -> list[pb.WorkerMessage]:
    """The data messages of an all-zero change in ``encoding``, built once for every client of the process."""
    wire = encodings.Encoder(encodings.parse(encoding)).encode(layout, np.zeros(layout.nbytes, np.uint8))
    return data_messages(wire)


async def _write(call: grpc.aio.StreamStreamCall, messages: list[pb.WorkerMessage]) -> None:
    """Writes a Round call's messages, up to the ps's end of the call, whose status the next read then raises.

    A write that meets the call's end fails; grpc.aio then usually reports
    INTERNAL in place of the ps's status (grpc/grpc#36066), which this says.
    """
    try:
        for message in messages:
            await call.write(message)
    except asyncio.InvalidStateError:
        return  # the call had ended: the status is the ps's
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.INTERNAL:
            raise
        raise LoadError("The ps ended a Round call while the worker wrote to it; grpc.aio lost the ps's status "
                        "(grpc/grpc#36066): the ps's log says why, if it refused the call.") from None


class Client:
    def __init__(self, address: str, task_index: int, metadata: tuple):
        self.task_index = task_index
        self._metadata = metadata
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.ParameterServerStub(self._channel)
        self.member_id = ""
        self._lease = 10.0
        self._calls_hold_lease = False
        self._long_poll = LONG_POLL_SECONDS
        self.encoding = encodings.FLOAT32  # what the ps takes updates as, once joined
        self.layout: Layout | None = None  # the global model's, once one arrived
        self._packed: np.ndarray | None = None  # the last global model, received into the same buffer each round
        self._open = 0        # Round calls open: while one is, no heartbeat is needed
        self._waiting: grpc.aio.StreamStreamCall | None = None  # the open call that waits for its model
        self._renewed: grpc.aio.StreamStreamCall | None = None  # the last call a renewal went into
        self._waiting_since = 0.0  # time.monotonic() when that call began to wait
        self._contact = 0.0   # time.monotonic() of the last message that renewed the lease
        self._keeper: asyncio.Task | None = None
        # Round calls made again (see round()), by the status that ended the one before.
        self.recalls: collections.Counter[str] = collections.Counter()
        self.join_retries = 0  # Joins made again after a refusal to retry

    async def join(self) -> None:
        """Joins, as a WorkerClient does: again after a pause when the ps is busy or says to retry."""
        delays = Backoff(base=0.5).delays()
        for attempt in itertools.count():
            try:
                reply = await self._stub.Join(
                    pb.JoinRequest(task_index=self.task_index, description=f"swarm {self.task_index}"),
                    timeout=UNARY_TIMEOUT_SECONDS, metadata=self._metadata, wait_for_ready=True)
                break
            except grpc.aio.AioRpcError as error:
                if error.code() not in JOIN_RETRIES or attempt >= MAX_JOIN_ATTEMPTS - 1:
                    raise
                self.join_retries += 1
                await asyncio.sleep(next(delays))
        self.member_id, self._lease = reply.member_id, reply.lease_seconds
        self._calls_hold_lease = reply.calls_hold_lease
        self._long_poll = reply.long_poll_seconds or LONG_POLL_SECONDS
        self.encoding = reply.update_encoding or encodings.FLOAT32
        self._contact = time.monotonic()
        self._keeper = asyncio.create_task(self._keep_lease())

    def _renewal_due(self) -> float:
        return renewal_due(self._contact, self._waiting_since, self._lease, self._long_poll,
                           self._calls_hold_lease and self._waiting is not None)

    async def _keep_lease(self) -> None:
        """WorkerClient's rule: a third of the lease after the last contact, a Heartbeat when no call is open, or
        a renewal into a call that waits for its model (where the ps says an open call holds the lease, when
        :func:`comind.client.renewal_due` says: the renewal then only probes the link)."""
        while True:
            await asyncio.sleep(max(0.0, self._renewal_due() - time.monotonic()))
            if time.monotonic() < self._renewal_due():
                continue  # a call renewed it meanwhile, or began to wait
            self._contact = time.monotonic()
            call = self._waiting
            if call is not None:
                self._renewed = call
                with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
                    await call.write(RENEWAL)  # if the call ended meanwhile, its reader sees how
            elif not self._open:
                await self._stub.Heartbeat(pb.HeartbeatRequest(member_id=self.member_id),
                                           timeout=UNARY_TIMEOUT_SECONDS, metadata=self._metadata)

    async def while_leased(self, work):
        """Awaits ``work``, failing as soon as the lease keeper fails (the lease is lost)."""
        task = asyncio.ensure_future(work)
        await asyncio.wait({task, self._keeper}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            self._keeper.result()  # raises what ended the keeper
        return task.result()

    async def round(self, have_round: int, update: Update | None) -> tuple[pb.Receipt | None, float, pb.ModelHeader]:
        """Round calls until the ps sends a model newer than ``have_round``: the first carries ``update``.

        Writes each message itself: handing gRPC an async generator costs a
        task per call, and the swarm's CPU is CPU the ps does not get.

        A renewal written just as the ps ends the call fails, and grpc.aio
        then ends the call with INTERNAL, model received or not (a sync
        WorkerClient does not see this: its request thread stops quietly).
        Such a call is made again, and so is one that ended with a status a
        WorkerClient retries (:data:`comind.client.RETRYABLE`, after a pause),
        counted in ``recalls``: its update again if no receipt came (the ps
        answers DUPLICATE), else none. (A client that gave up on those instead
        kept its lease with Heartbeats and, once selected, held a round until
        its deadline: the "stall" of a run at 5,000 workers.)

        Returns:
            The first receipt, when it arrived (``time.monotonic()``), and the model's header; the model is in
            ``self._packed``.
        """
        receipt, acked = None, 0.0
        delays = Backoff().delays()
        while True:
            hello = pb.Hello(member_id=self.member_id, have_round=have_round)
            if update is not None:
                encoding = self.encoding if update.kind == pb.UPDATE_KIND_DELTA else encodings.FLOAT32
                hello.update.CopyFrom(pb.UpdateHeader(kind=update.kind, round=update.round, num_examples=EXAMPLES,
                                                      tensors=update.layout.to_proto(), encoding=encoding))
            model_bytes = self.layout.nbytes if self.layout else update.layout.nbytes if update else 0
            call = self._stub.Round(timeout=round_call_seconds(update.layout.nbytes if update else 0, model_bytes,
                                                               self._long_poll),
                                    metadata=self._metadata)
            self._open += 1
            try:
                await _write(call, [pb.WorkerMessage(hello=hello), *(update.data if update is not None else ())])
                self._contact = self._waiting_since = time.monotonic()
                self._waiting = call
                message = await call.read()
                if message is not grpc.aio.EOF and message.HasField("receipt"):
                    if update is None:
                        raise LoadError(f"The ps sent a receipt, {message.receipt}, for no update.")
                    if receipt is None:
                        receipt, acked = message.receipt, time.monotonic()
                    message = await call.read()
                elif update is not None:
                    raise LoadError(f"The ps answered an update for round {update.round} with {message} "
                                    f"instead of a receipt.")
                update = None
                self._waiting = None
                if message is grpc.aio.EOF or not message.HasField("model"):
                    raise LoadError(f"The ps sent {message} instead of a model header.")
                header = message.model
                if header.ready:
                    await self._receive(call, header, message.data)
                if await call.read() is not grpc.aio.EOF:
                    raise LoadError("The ps sent more after the model.")
            except grpc.aio.AioRpcError as error:
                raced = error.code() == grpc.StatusCode.INTERNAL and self._renewed is call
                if not raced and error.code() not in RETRYABLE:
                    raise
                self.recalls[error.code().name] += 1
                if not raced:
                    await asyncio.sleep(next(delays))
                continue
            finally:
                self._waiting = None
                self._open -= 1
                self._contact = time.monotonic()  # a call's end renews the lease
            if header.ready:
                return receipt, acked, header
            update = None  # a long poll ended before the round closed: ask again

    async def _receive(self, call, header: pb.ModelHeader, first: bytes) -> None:
        self.layout = Layout.from_proto(header.tensors, max_bytes=1 << 62)
        reuse = self._packed is not None and self._packed.nbytes == self.layout.nbytes
        assembler = Assembler(self.layout, buffer=self._packed if reuse else None)
        assembler.feed(first)
        while assembler.received < self.layout.nbytes:
            message = await call.read()
            if message is grpc.aio.EOF:
                break  # the assembler reports the truncation
            assembler.feed(message.data)
        self._packed = assembler.finish()

    async def leave(self) -> None:
        if self._keeper:
            self._keeper.cancel()
        try:
            await self._stub.Leave(pb.LeaveRequest(member_id=self.member_id), timeout=UNARY_TIMEOUT_SECONDS,
                                   metadata=self._metadata)
        finally:
            await self._channel.close()


async def train(client: Client, rounds: int, initial: list[np.ndarray] | None) -> tuple[list[Push], list[Received]]:
    """Takes part in every round the ps gives it a model for, until the final model; the client stays joined."""
    if initial is not None:
        layout = Layout.of(initial)
        model = data_messages(layout.pack(initial))
        receipt, _, header = await client.round(-1, Update(pb.UPDATE_KIND_INITIAL, 0, layout, model))
        if receipt.result != pb.UPDATE_RESULT_ACCEPTED:
            raise LoadError(f"The ps answered {receipt} to the initial model.")
    else:
        _, _, header = await client.round(-1, None)
    assert client.layout is not None
    layout = client.layout
    pushes, models = [], [Received(header.round, time.monotonic())]
    while not header.done:
        target = header.round + 1
        pushed, recalls = time.monotonic(), client.recalls.total()
        receipt, acked, header = await client.round(
            target - 1, Update(pb.UPDATE_KIND_DELTA, target, layout, zero_change(layout, client.encoding)))
        # Sent again after a recall, the update may be a duplicate of itself.
        recalled = client.recalls.total() > recalls
        expected = {pb.UPDATE_RESULT_ACCEPTED} | ({pb.UPDATE_RESULT_DUPLICATE} if recalled else set())
        if receipt.result not in expected or receipt.round != target:
            raise LoadError(f"The ps answered {receipt} to the first update for round {target}.")
        # Without sampling the next model is the round's; with it, the round's or a later one (once selected again).
        if header.round < target or header.done != (header.round == rounds):
            raise LoadError(f"Received round {header.round} (done={header.done}) after the update for round "
                            f"{target}.")
        pushes.append(Push(target, pushed, acked))
        models.append(Received(header.round, time.monotonic()))
    return pushes, models


async def run_client(client: Client, rounds: int, initial: list[np.ndarray] | None, joining: asyncio.Semaphore,
                     released: asyncio.Future | None = None) -> dict:
    """One client's report: its updates and models with their times, or what went wrong. It joins while it
    holds ``joining``; the chief holds its initial model until ``released`` is done, if given."""
    report: dict = {"task": client.task_index, "pushes": [], "models": [], "error": None}
    doing = "joining"  # for the error line: which calls failed
    try:
        async with joining:
            await client.join()
        doing = "in its rounds"
        if released is not None:
            await client.while_leased(released)
        pushes, models = await client.while_leased(train(client, rounds, initial))
        report.update(pushes=[dataclasses.astuple(p) for p in pushes], models=[dataclasses.astuple(m) for m in models])
    except (grpc.aio.AioRpcError, LoadError) as error:
        report["error"] = doing + ": " + (f"{error.code().name}: {error.details()}"
                                          if isinstance(error, grpc.aio.AioRpcError) else str(error))
        # Said at once, and the client leaves: one that kept its lease would hold a round that selects it.
        print(f"swarm: worker {client.task_index}: {report['error']}", file=sys.stderr, flush=True)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await client.leave()
    return {**report, "recalls": dict(client.recalls), "join_retries": client.join_retries}


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--tasks", required=True, help="task indices START:STOP; task 0 gives the initial model")
    parser.add_argument("--model-bytes", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--hold-initial", action="store_true",
                        help="the chief gives the initial model only once a line arrives on stdin")
    flags = parser.parse_args(argv)
    start, stop = (int(part) for part in flags.tasks.split(":"))
    metadata = call_metadata(os.environ.get("COMIND_TOKEN"))
    clients = [Client(flags.address, task, metadata) for task in range(start, stop)]
    initial = make_model(flags.model_bytes) if start == 0 else None
    released = asyncio.ensure_future(asyncio.to_thread(sys.stdin.readline)) if flags.hold_initial else None
    joining = asyncio.Semaphore(JOINS_AT_ONCE)
    reports = await asyncio.gather(*(run_client(c, flags.rounds, initial if c.task_index == 0 else None, joining,
                                                released if c.task_index == 0 else None) for c in clients))
    print(json.dumps(reports), flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    await asyncio.gather(*(c.leave() for c in clients), return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
