"""What gRPC alone costs the ps per Round call: the floor under bench/load.py's ps CPU.

A bare ``grpc.aio`` server, with the ps's channel options, in a process of its own, takes the messages a worker's
Round call carries (the hello alone, the update's chunks, the end) and writes what the ps writes back (the receipt,
then the model's messages), without parsing, checking or adding anything. Its CPU per call (user + system, all
its threads) is what any ps on grpc.aio pays to move those bytes; the rest of ``comind ps``'s is its own. Renewals
are left out: how many a call carries depends on how long its round waits.

    .venv/bin/python bench/grpc_floor.py

prints the floor for bench/load.py's scenarios; bench/load.py prints it beside the ps's CPU.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import resource
import sys
from collections.abc import Sequence

import grpc
import numpy as np

from comind.proto import comind_pb2 as pb
from comind.protocol import GRPC_OPTIONS
from comind.service import SERVER_OPTIONS
from comind.tensors import chunks

_METHOD = "/floor.Floor/Round"
#: Calls at once: as many as bench/load.py's load generators keep open, give or take.
CONCURRENCY = 64


def _worker_messages(update_bytes: int) -> list[bytes]:
    hello = pb.WorkerMessage(hello=pb.Hello(member_id="m" * 32, have_round=1, update=pb.UpdateHeader(round=1)))
    update = np.zeros(update_bytes, np.uint8)
    return [hello.SerializeToString(), *(pb.WorkerMessage(data=data).SerializeToString() for data in chunks(update)),
            pb.WorkerMessage(end=True).SerializeToString()]


def _ps_messages(model_bytes: int) -> list[bytes]:
    receipt = pb.PsMessage(receipt=pb.Receipt(round=1, result=pb.UPDATE_RESULT_ACCEPTED))
    parts = list(chunks(np.zeros(model_bytes, np.uint8)))
    first = pb.PsMessage(model=pb.ModelHeader(ready=True, round=2), data=parts[0])
    return [receipt.SerializeToString(), first.SerializeToString(),
            *(pb.PsMessage(data=data).SerializeToString() for data in parts[1:])]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _serve(incoming: int, outgoing: list[bytes], ports: multiprocessing.Queue, stop: multiprocessing.Queue
                 ) -> None:
    async def round_call(requests, context) -> None:
        count = 0
        async for _ in requests:
            count += 1
            if count == incoming:
                break
        for message in outgoing:
            await context.write(message)

    server = grpc.aio.server(options=GRPC_OPTIONS + SERVER_OPTIONS)
    handler = grpc.stream_stream_rpc_method_handler(round_call)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor.Floor", {"Round": handler}),))
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    await server.start()
    loop = asyncio.get_running_loop()
    while True:
        started = _cpu_seconds()
        if await loop.run_in_executor(None, stop.get) is None:
            break
        ports.put(_cpu_seconds() - started)
    await server.stop(0)


def _server(incoming: int, outgoing: list[bytes], ports: multiprocessing.Queue, stop: multiprocessing.Queue) -> None:
    asyncio.run(_serve(incoming, outgoing, ports, stop))


async def _calls(port: int, messages: list[bytes], count: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as channel:
        method = channel.stream_stream(_METHOD)
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one() -> None:
            async with limit:
                call = method()
                for message in messages:
                    await call.write(message)
                await call.done_writing()
                async for _ in call:
                    pass

        await asyncio.gather(*(one() for _ in range(count)))


def ms_per_call(update_bytes: int, model_bytes: int, calls: int) -> float:
    """The bare server's CPU milliseconds per Round call carrying an update of ``update_bytes`` up and a model of
    ``model_bytes`` down, ``calls`` of them, after as many warm-up calls."""
    worker = _worker_messages(update_bytes)
    context = multiprocessing.get_context("spawn")  # gRPC must not cross a fork
    ports, stop = context.Queue(), context.Queue()
    server = context.Process(target=_server, args=(len(worker), _ps_messages(model_bytes), ports, stop),
                             daemon=True)
    server.start()
    try:
        port = ports.get(timeout=60)
        asyncio.run(_calls(port, worker, calls))  # warm-up: connections, allocators, caches
        stop.put(True)
        ports.get(timeout=600)
        asyncio.run(_calls(port, worker, calls))
        stop.put(True)
        return ports.get(timeout=600) * 1e3 / calls
    finally:
        stop.put(None)
        server.join(30)


def main(argv: Sequence[str] | None = None) -> int:
    del argv
    print(f"bare grpc.aio server, {CONCURRENCY} calls at once (load average {os.getloadavg()[0]:.2f}):")
    for name, update_bytes, model_bytes, calls in (("0.4 MB up and down", 400_000, 400_000, 1000),
                                                    ("10 MB up and down", 10_000_000, 10_000_000, 64),
                                                    ("2.5 MB up (int8), 10 MB down", 2_500_000, 10_000_000, 64)):
        print(f"  {name:32s} {ms_per_call(update_bytes, model_bytes, calls):7.2f} ms of server CPU per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
