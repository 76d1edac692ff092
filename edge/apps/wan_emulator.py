"""The emulated wide-area link between the edge and the cloud, in one place for the demo, the benchmarks and the
tests. Two ways to emulate it, both giving the edge a real socket with real latency:

- `DelayProxy`: a userspace TCP relay on loopback that delivers every byte one-way-delay later, serialised at the
  link rate, in each direction. Needs nothing; `coexit demo` runs the edge-cloud traffic through it by default
  (50 ms RTT, 20 Mbit/s).
- `netem_namespace`: the cloud in its own network namespace behind a veth pair with tc netem delay and rate on
  both ends (needs root and a kernel with netem; `netem_available()` says whether this host has both). The
  benchmarks prefer it where it exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
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


# ---- netem: a namespace with kernel-side delay and rate ---------------------------------------------------------
NS, VETH_EDGE, VETH_CLOUD = "coexit-cloud", "coexit-e0", "coexit-c0"
EDGE_IP, CLOUD_IP = "10.77.0.1", "10.77.0.2"


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def netem_available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "not root: network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return False, "iproute2 (ip, tc) is not installed"
    probe = _sh("tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms")
    _sh("tc", "qdisc", "del", "dev", "lo", "root")
    if probe.returncode != 0:
        return False, f"tc netem unavailable in this kernel ({probe.stderr.strip()})"
    return True, "netns + netem"


@contextlib.contextmanager
def netem_namespace(rtt_ms: float, mbit: float):
    """Yields (command prefix to run the cloud inside the namespace, cloud IP)."""
    teardown()
    one_way = f"{rtt_ms / 2:g}ms"
    steps = [("ip", "netns", "add", NS), ("ip", "link", "add", VETH_EDGE, "type", "veth", "peer", "name", VETH_CLOUD),
             ("ip", "link", "set", VETH_CLOUD, "netns", NS), ("ip", "addr", "add", f"{EDGE_IP}/24", "dev", VETH_EDGE),
             ("ip", "link", "set", VETH_EDGE, "up"),
             ("ip", "netns", "exec", NS, "ip", "addr", "add", f"{CLOUD_IP}/24", "dev", VETH_CLOUD),
             ("ip", "netns", "exec", NS, "ip", "link", "set", VETH_CLOUD, "up"),
             ("ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up"),
             ("tc", "qdisc", "add", "dev", VETH_EDGE, "root", "netem", "delay", one_way, "rate", f"{mbit:g}mbit"),
             ("ip", "netns", "exec", NS, "tc", "qdisc", "add", "dev", VETH_CLOUD, "root", "netem", "delay", one_way,
              "rate", f"{mbit:g}mbit")]
    try:
        for step in steps:
            r = _sh(*step)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(step)}: {r.stderr.strip()}")
        yield ["ip", "netns", "exec", NS], CLOUD_IP
    finally:
        teardown()


def teardown() -> None:
    _sh("ip", "link", "del", VETH_EDGE)
    _sh("ip", "netns", "del", NS)
