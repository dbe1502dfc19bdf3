"""A burst of calls larger than gRPC queues by default is answered whole: when the long polls of thousands of
waiting workers end together, they all call again at once (comind.service.pending_call_options)."""

from __future__ import annotations

import asyncio
import collections

import grpc

from comind.proto import comind_pb2 as pb
from comind.proto import comind_pb2_grpc as pb_grpc

BURST = 8000  # with gRPC's default queue, about half of these were cancelled
CHANNELS = 20


async def _heartbeats(address: str) -> collections.Counter[str]:
    """The status of each of a burst of Heartbeats, all sent at once, for members the ps does not know."""
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(CHANNELS)]
    try:
        await asyncio.gather(*(channel.channel_ready() for channel in channels))
        stubs = [pb_grpc.ParameterServerStub(channel) for channel in channels]
        codes: collections.Counter[str] = collections.Counter()

        async def one(index: int) -> None:
            try:
                await stubs[index % CHANNELS].Heartbeat(pb.HeartbeatRequest(member_id=f"{index:032d}"), timeout=120)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as error:
                codes[error.code().name] += 1

        await asyncio.gather(*(one(index) for index in range(BURST)))
        return codes
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def test_the_ps_answers_every_call_of_a_burst_itself(start_ps):
    ps = start_ps("--num-workers", str(BURST), "--rounds", "1")
    # NOT_FOUND is the ps's own answer to a member it does not know; a call gRPC gave up on is CANCELLED.
    assert asyncio.run(_heartbeats(ps.address)) == {"NOT_FOUND": BURST}
