"""Graceful drain on SIGTERM: health turns NOT_SERVING, new Opens get UNAVAILABLE, an Append being computed still
gets its token, idle streams end with UNAVAILABLE after the grace period, the process exits 0; and an edge client
mid-generation moves to a second server on the same port without losing or changing a token."""

from __future__ import annotations

import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import coexit
from cloud.launch import free_port, start_cloud
from coexit.decoding import generate_full
from coexit.exits import ExitPolicy
from coexit.v1 import coexit_pb2 as pb
from coexit.v1.convert import tensor_to_proto
from edge.backends import TorchBackend
from edge.client import EdgeClient
from edge.link import CloudLink, CloudUnavailable


def test_sigterm_drains(tiny_dir):
    full = coexit.load(tiny_dir)
    ids = torch.randint(3, full.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rows = full.stage(0, full.config.split_layer)(ids).hidden[0]
    # one row per tick: the 200-row upload below takes many ticks, so SIGTERM lands while it is computed
    proc, address = start_cloud(tiny_dir, extra_args=["--drain-grace", "2", "--rows-per-tick", "1"])
    link = CloudLink(address, deadline_s=20)
    busy, idle = link.stream(), link.stream()
    for s in (busy, idle):
        s.request(pb.SessionRequest(open=pb.OpenRequest(fingerprint=full.fingerprint)))
    busy._requests.put(pb.SessionRequest(append=pb.AppendRequest(
        first_position=0, hidden=tensor_to_proto(rows, "fp32"), want_token=True)))
    time.sleep(0.1)
    t0 = time.monotonic()
    proc.terminate()
    time.sleep(0.2)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(CloudUnavailable, match="shutting down"):
        CloudLink(address).stream().request(pb.SessionRequest(open=pb.OpenRequest(fingerprint=full.fingerprint)))
    reply = busy._replies.get(timeout=20)  # the Append in flight finished
    assert not isinstance(reply, Exception), reply
    with torch.no_grad():
        assert reply.appended.token_id == int(full(ids).logits[0, -1].argmax())
    with pytest.raises(CloudUnavailable):  # an idle stream ends with UNAVAILABLE
        idle.request(pb.SessionRequest(append=pb.AppendRequest(first_position=0, hidden=tensor_to_proto(rows[:1],
                                                                                                         "fp32"))))
    assert proc.wait(timeout=15) == 0
    assert time.monotonic() - t0 < 2 + 5
    link.close()


def test_edge_moves_to_a_second_server_without_losing_tokens(tiny_dir):
    full = coexit.load(tiny_dir)
    port = free_port()
    proc, _ = start_cloud(tiny_dir, port, extra_args=["--drain-grace", "1"])
    client = EdgeClient(TorchBackend.from_checkpoint(tiny_dir), full.tokenizer, cloud=f"127.0.0.1:{port}",
                        deadline_s=3.0, retry_s=0.2)
    ids = full.tokenizer.encode("class Point:\n    def __init__(self, x, y):", add_bos=True)
    run = client.stream(ids, 24, policy=ExitPolicy.never(), stop_at_eos=False)
    events = []
    try:
        for ev in run:
            events.append(ev)
            if len(events) == 6:
                proc.terminate()  # drain: the edge's next Append gets UNAVAILABLE
                assert proc.wait(timeout=15) == 0
                proc, _ = start_cloud(tiny_dir, port)  # the second server, on the same address
            if len(events) == 10:  # the edge went standalone at token 7; its retry timer has run out by now
                time.sleep(0.3)
    finally:
        proc.kill()
        proc.wait()
        client.close()
    assert [e.position for e in events] == list(range(len(ids), len(ids) + 24))  # nothing lost or repeated
    assert [e.token_id for e in events[:6]] == generate_full(full, ids, 6)
    assert events[-1].origin == "cloud" and run.counters.sessions_opened == 2
    seq = ids + [e.token_id for e in events]
    with torch.no_grad():
        logits = full(torch.tensor([seq])).logits[0]
    for e in events:  # every cloud token is the full model's choice for the sequence actually emitted
        if e.origin == "cloud":
            assert e.token_id == int(logits[e.position - 1].argmax())
