"""Many simulated workers in one process: asyncio gRPC clients that speak the real protocol.

``WorkerClient`` spends a thread per worker; a load test needs hundreds of
workers per process, so each client here is a few coroutines instead. They
make the calls a ``WorkerClient`` makes, in its order and with its timeouts:
Register, a Heartbeat every third of the lease, Initialize (the chief),
PushUpdate streams, PullModel long polls, Leave. A client does no training:
it pushes back the global model it last received, so every update is a
valid, finite model of the right layout.

Each client has a channel and a TCP connection of its own, as workers on
separate machines would (gRPC would otherwise share one connection between
channels to the same address).

Run by ``bench/load.py``, one process per slice of the task indices:

    python bench/swarm.py --address HOST:PORT --tasks 0:250 --model-bytes 400000 --rounds 20

The token, if any, comes from ``COMIND_TOKEN``. When every client is done it
prints one JSON line (see :func:`report`) and keeps its workers registered
until a line arrives on stdin, so the ps is still up when the parent reads
its figures; then they all leave.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time

import grpc
import numpy as np

from comind.auth import call_metadata
from comind.client import MIN_BYTES_PER_SECOND, UNARY_TIMEOUT_SECONDS
from comind.proto import comind_pb2 as pb
from comind.proto import comind_pb2_grpc as pb_grpc
from comind.protocol import GRPC_OPTIONS, LONG_POLL_SECONDS
from comind.tensors import Assembler, Layout, chunks
from core import EXAMPLES, make_model

CHANNEL_OPTIONS = GRPC_OPTIONS + [("grpc.keepalive_time_ms", 30000), ("grpc.use_local_subchannel_pool", 1)]


class LoadError(RuntimeError):
    """The ps answered something a correct ps would not."""


@dataclasses.dataclass(frozen=True)
class RoundTiming:
    """One round as a client saw it, in ``time.monotonic()`` seconds (one clock for
    every process on the machine)."""

    round: int
    pushed: float    # the push started
    acked: float     # the ps acknowledged it
    received: float  # the new global model was complete


class Client:
    def __init__(self, address: str, task_index: int, metadata: tuple):
        self.task_index = task_index
        self._metadata = metadata
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.ParameterServerStub(self._channel)
        self.member_id = ""
        self._lease = 10.0
        self._layout: Layout | None = None
        self._packed: np.ndarray | None = None  # the last global model, pushed back as the update
        self._heartbeats: asyncio.Task | None = None

    async def register(self) -> None:
        reply = await self._stub.Register(
            pb.RegisterRequest(task_index=self.task_index, description=f"swarm {self.task_index}"),
            timeout=UNARY_TIMEOUT_SECONDS, metadata=self._metadata)
        self.member_id, self._lease = reply.member_id, reply.lease_seconds
        self._heartbeats = asyncio.create_task(self._keep_lease())

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            await self._stub.Heartbeat(pb.HeartbeatRequest(member_id=self.member_id),
                                       timeout=UNARY_TIMEOUT_SECONDS, metadata=self._metadata)

    async def while_leased(self, work):
        """Awaits ``work``, failing as soon as a heartbeat fails (the lease is lost)."""
        task = asyncio.ensure_future(work)
        await asyncio.wait({task, self._heartbeats}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            self._heartbeats.result()  # raises what ended the heartbeats
        return task.result()

    def _transfer_timeout(self, nbytes: int) -> float:
        return UNARY_TIMEOUT_SECONDS + nbytes / MIN_BYTES_PER_SECOND

    async def _stream(self, method, header: pb.UpdateHeader, packed: np.ndarray):
        """Streams a model to ``method`` and returns the reply.

        Writes each message itself: handing gRPC an async generator costs a
        task per call, and the swarm's CPU is CPU the ps does not get.
        """
        call = method(timeout=self._transfer_timeout(packed.nbytes), metadata=self._metadata)
        await call.write(pb.UpdateChunk(header=header))
        for data in chunks(packed):
            await call.write(pb.UpdateChunk(data=data))
        await call.done_writing()
        return await call

    async def initialize(self, weights: list[np.ndarray]) -> None:
        layout = Layout.of(weights)
        header = pb.UpdateHeader(member_id=self.member_id, tensors=layout.to_proto())
        await self._stream(self._stub.Initialize, header, layout.pack(weights))

    async def push(self, round: int) -> None:
        header = pb.UpdateHeader(member_id=self.member_id, round=round, num_examples=EXAMPLES,
                                 tensors=self._layout.to_proto())
        reply = await self._stream(self._stub.PushUpdate, header, self._packed)
        if reply.duplicate or reply.round != round:
            raise LoadError(f"The ps answered {reply} to the first push for round {round}.")

    async def pull(self, after_round: int) -> pb.ModelHeader:
        """The first global model newer than ``after_round``, long polling as WorkerClient does."""
        request = pb.PullRequest(member_id=self.member_id, after_round=after_round)
        nbytes = self._layout.nbytes if self._layout else 0
        while True:
            call = self._stub.PullModel(request, timeout=LONG_POLL_SECONDS + self._transfer_timeout(nbytes),
                                        metadata=self._metadata)
            messages = aiter(call)
            header = (await anext(messages)).header
            if header.ready:
                break
        self._layout = Layout.from_proto(header.tensors, max_bytes=1 << 62)
        # The model is replaced every round: receive into the same buffer.
        reuse = self._packed is not None and self._packed.nbytes == self._layout.nbytes
        assembler = Assembler(self._layout, buffer=self._packed if reuse else None)
        async for message in messages:
            assembler.feed(message.data)
        self._packed = assembler.finish()
        return header

    async def leave(self) -> None:
        if self._heartbeats:
            self._heartbeats.cancel()
        try:
            await self._stub.Leave(pb.LeaveRequest(member_id=self.member_id), timeout=UNARY_TIMEOUT_SECONDS,
                                   metadata=self._metadata)
        finally:
            await self._channel.close()


async def train(client: Client, rounds: int, initial: list[np.ndarray] | None) -> list[RoundTiming]:
    """Joins, then pushes and pulls until the ps's last round; the client stays registered."""
    if initial is not None:
        await client.initialize(initial)
    header = await client.pull(after_round=-1)
    timings = []
    for target in range(header.round + 1, rounds + 1):
        pushed = time.monotonic()
        await client.push(target)
        acked = time.monotonic()
        header = await client.pull(after_round=target - 1)
        if header.round != target or header.done != (target == rounds):
            raise LoadError(f"Pulled round {header.round} (done={header.done}) after pushing for round {target}.")
        timings.append(RoundTiming(target, pushed, acked, time.monotonic()))
    return timings


async def run_client(client: Client, rounds: int, initial: list[np.ndarray] | None) -> dict:
    """One client's report: its timings, or what went wrong."""
    try:
        await client.register()
        timings = await client.while_leased(train(client, rounds, initial))
    except (grpc.aio.AioRpcError, LoadError) as error:
        problem = f"{error.code().name}: {error.details()}" if isinstance(error, grpc.aio.AioRpcError) else str(error)
        return {"task": client.task_index, "timings": [], "error": problem}
    return {"task": client.task_index, "timings": [dataclasses.astuple(t) for t in timings], "error": None}


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--tasks", required=True, help="task indices START:STOP; task 0 initializes the model")
    parser.add_argument("--model-bytes", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    flags = parser.parse_args(argv)
    start, stop = (int(part) for part in flags.tasks.split(":"))
    metadata = call_metadata(os.environ.get("COMIND_TOKEN"))
    clients = [Client(flags.address, task, metadata) for task in range(start, stop)]
    initial = make_model(flags.model_bytes) if start == 0 else None
    reports = await asyncio.gather(*(run_client(c, flags.rounds, initial if c.task_index == 0 else None)
                                     for c in clients))
    print(json.dumps(reports), flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    await asyncio.gather(*(c.leave() for c in clients), return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
