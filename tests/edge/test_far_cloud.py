"""A cloud far away (a 400 ms round trip) answers the first request of a fresh client: gRPC's connect attempts must
be allowed longer than the HTTP/2 handshake takes over the link."""

from __future__ import annotations

import coexit
from cloud.server import ServerThread
from edge.apps.wan_emulator import DelayProxy
from edge.backends import TorchBackend
from edge.client import EdgeClient


def test_first_request_over_a_slow_link_connects(tiny_dir):
    full = coexit.load(tiny_dir)
    with ServerThread(full) as srv:
        host, port = srv.address.rsplit(":", 1)
        proxy = DelayProxy(host, int(port), 400, 20)
        try:
            address = proxy.start()
            for mode in ("cloud-only", "collaborative"):  # each opens its channel cold
                client = EdgeClient(TorchBackend.from_checkpoint(tiny_dir), full.tokenizer, cloud=address,
                                    deadline_s=10.0)
                gen = client.generate("def add(a, b):", 2, mode=mode, stop_at_eos=False)
                client.close()
                assert [e.origin for e in gen.events] == ["cloud", "cloud"] and gen.counters.standalone == 0
        finally:
            proxy.stop()
