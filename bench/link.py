"""An emulated slow link between the edge and the cloud for benchmarks.

Preferred: network namespaces with tc netem (the cloud runs in its own namespace behind a veth pair with delay and
rate on both ends). Where netem or root is missing, edge.wan.DelayProxy, a userspace TCP relay on loopback, adds
the same one-way delay and serialisation time per direction. Either way the edge talks to a real socket with real
latency.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

from edge.wan import DelayProxy  # noqa: F401  (re-exported for the benchmarks)

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
