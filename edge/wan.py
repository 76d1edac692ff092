"""An emulated wide-area link between the edge and the cloud: a userspace TCP relay on loopback that delivers
every byte one-way-delay later, serialised at the link rate, in each direction. `coexit demo` runs the edge-cloud
traffic through it by default (50 ms RTT, 20 Mbit/s), and the benchmarks use it where netem is unavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time


class DelayProxy:
    """A loopback TCP relay: every byte is delivered one_way_s later, at most mbit megabits per second."""

    def __init__(self, target_host: str, target_port: int, rtt_ms: float, mbit: float) -> None:
        self.target = (target_host, target_port)
        self.one_way = rtt_ms / 2000.0
        self.bytes_per_s = mbit * 1e6 / 8
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="coexit-link")
        self.port = 0

    async def _pump(self, reader, writer) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        link_free = time.monotonic()

        async def deliver():
            while True:
                due, data = await queue.get()
                if data is None:
                    break
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()
            writer.close()

        task = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(65536):
                now = time.monotonic()
                link_free = max(link_free, now) + len(data) / self.bytes_per_s  # serialisation at the link rate
                await queue.put((link_free + self.one_way, data))
        finally:
            await queue.put((0.0, None))
            await task

    async def _handle(self, reader, writer) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        for w in (writer, up_w):  # the delay is the link's, not Nagle's
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(self._pump(reader, up_w), self._pump(up_r, writer), return_exceptions=True)

    def start(self) -> str:
        self.thread.start()

        async def serve():
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            return self.server.sockets[0].getsockname()[1]

        self.port = asyncio.run_coroutine_threadsafe(serve(), self.loop).result(10)
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def close():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
