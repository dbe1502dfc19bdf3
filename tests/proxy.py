"""A TCP proxy between a worker and the ps that breaks the link the way networks do.

It forwards every connection to the ps; it can reset the first connection
once, after a given number of bytes went up it (a worker's update cut short),
and it can throttle what goes up to a rate (a slow uplink). Runs its own
asyncio loop in a thread.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time


class Proxy:
    def __init__(self, target: str, *, reset_after_bytes: int | None = None, bytes_per_second: float | None = None):
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._reset_after = reset_after_bytes
        self._rate = bytes_per_second
        self.resets = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(10)
        self.address = f"127.0.0.1:{self._port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._connect, "127.0.0.1", 0))
        self._port = self._server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = self.connections == 1
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        up = asyncio.ensure_future(self._pump(reader, upstream_writer, limit=self._reset_after if first else None,
                                              rate=self._rate))
        down = asyncio.ensure_future(self._pump(upstream_reader, writer))
        done, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        if up in done and up.result() == "reset":
            self.resets += 1
            for stream in (writer, upstream_writer):
                # SO_LINGER 0: close with a RST, as a dropped NAT entry or a crashed middlebox does.
                stream.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                           struct.pack("ii", 1, 0))
        for task in pending:
            task.cancel()
        for stream in (writer, upstream_writer):
            stream.close()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int | None = None,
                    rate: float | None = None) -> str:
        sent = 0
        started = time.monotonic()
        while data := await reader.read(16384):
            if limit is not None and sent + len(data) > limit:
                return "reset"
            writer.write(data)
            await writer.drain()
            sent += len(data)
            if rate:
                await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))
        return "closed"
