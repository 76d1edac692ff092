"""The shipped balancer configurations (deploy/haproxy/haproxy.cfg, deploy/nginx/nginx.conf), run as they are with
real `haproxy` and `nginx` processes (cloud/balancer.py) in front of three real `coexit serve` replicas on
loopback; only the server list, the listen address and the idle timeout are the test's. The edge SDK talks to the
balancer only.

`make setup` installs haproxy and nginx from Debian's packages when it runs as root; without them these tests skip."""

from __future__ import annotations

import re
import signal
import socket
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

import coexit
from cloud.balancer import Balancer, installed
from cloud.launch import free_port, start_cloud, wait_until
from coexit.decoding import generate_full
from coexit.exits import ExitPolicy
from coexit.v1 import coexit_pb2 as pb
from edge.backends import TorchBackend
from edge.client import EdgeClient
from edge.link import CloudError, CloudLink

ROOT = Path(__file__).resolve().parents[2]
IDLE_S = 1.0  # the balancers' idle timeout in these tests (60 s as shipped)


class Replica:
    def __init__(self, model_dir, port: int | None = None) -> None:
        self.port, self.health, self.metrics = port or free_port(), free_port(), free_port()
        self.model_dir = model_dir
        self.start()

    def start(self) -> None:
        self.proc, self.address = start_cloud(self.model_dir, self.port, [
            "--health-http-port", str(self.health), "--metrics-port", str(self.metrics), "--drain-grace", "5"])

    def gauge(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5).read().decode()
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def stop(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def replicas(tiny_dir):
    rs = [Replica(tiny_dir) for _ in range(3)]
    yield rs
    for r in rs:
        r.stop(signal.SIGTERM)


@pytest.fixture(params=["haproxy", "nginx"])
def balancer(request, replicas):
    if not installed(request.param):
        pytest.skip(f"{request.param} is not installed (`make setup` installs it from Debian's packages as root)")
    for r in replicas:  # a test before may have killed one
        if r.proc.poll() is not None:
            r.start()
    with tempfile.TemporaryDirectory() as tmp:
        b = Balancer(request.param, [(r.port, r.health) for r in replicas], Path(tmp), IDLE_S)
        try:
            yield b
        finally:
            b.close()


def _sessions(replicas) -> list[float]:
    return [r.gauge("coexit_sessions") for r in replicas]


def _home(replicas, before: list[float]) -> Replica:
    """The replica that gained a session since `before` (the replicas' own gauges)."""
    gained = [r for r, b in zip(replicas, before) if r.gauge("coexit_sessions") > b]
    assert len(gained) == 1, gained
    return gained[0]


def _open(link: CloudLink, key: str, fingerprint: str, **kw):
    stream = link.stream(key, **kw)
    reply = stream.request(pb.SessionRequest(open=pb.OpenRequest(fingerprint=fingerprint, max_length=64,
                                                                 encoding=pb.FP32, input=pb.TOKENS)))
    return stream, reply.opened


def _resume(link: CloudLink, key: str, fingerprint: str, session_id: str):
    """The edge's resume behind a balancer (feature resume_or_open): resumed where the session lives, else anew."""
    stream = link.stream(key)
    reply = stream.request(pb.SessionRequest(open=pb.OpenRequest(
        fingerprint=fingerprint, max_length=64, encoding=pb.FP32, input=pb.TOKENS, resume_id=session_id,
        open_if_missing=True)))
    return stream, reply.opened


def test_every_stream_of_a_key_reaches_one_replica(tiny_dir, replicas, balancer):
    """Open a session per key, drop its stream, resume it on a new stream with the same key: a resume only succeeds
    on the replica that holds the session, so every one must reach it; and the keys spread over the replicas."""
    fp = coexit.load(tiny_dir).fingerprint
    link = CloudLink(balancer.address)
    before = [r.gauge("coexit_sessions") for r in replicas]
    held = []
    try:
        for i in range(12):
            stream, opened = _open(link, f"key-{i}", fp)
            stream.cancel()
            again = link.stream(f"key-{i}")
            reply = again.request(pb.SessionRequest(open=pb.OpenRequest(fingerprint=fp, resume_id=opened.session_id)))
            assert reply.opened.resumed and reply.opened.session_id == opened.session_id
            held.append(again)
        per_replica = [r.gauge("coexit_sessions") - b for r, b in zip(replicas, before)]
        assert sum(per_replica) == 12 and sum(n > 0 for n in per_replica) >= 2, per_replica  # keys spread
    finally:
        for s in held:
            s.close()
        link.close()


@pytest.mark.parametrize("kill_at", [6])
def test_a_killed_replica_costs_one_replay(tiny_dir, replicas, balancer, kill_at):
    """Kill the replica serving a generation mid-stream: the edge finishes with the full model's tokens (lossless:
    it never emits an unverified token), none lost or repeated, after exactly one new session on another replica."""
    full = coexit.load(tiny_dir)
    ids = full.tokenizer.encode("def add(a, b):", add_bos=True)
    want = generate_full(full, ids, 20)
    client = EdgeClient(TorchBackend.from_checkpoint(tiny_dir), full.tokenizer, cloud=balancer.address,
                        mode="lossless", policy=ExitPolicy.never(), draft_always=False, deadline_s=5.0)
    before = _sessions(replicas)
    run = client.stream(ids, 20, stop_at_eos=False)
    got = []
    for ev in run:
        got.append(ev.token_id)
        if len(got) == kill_at:
            _home(replicas, before).stop(signal.SIGKILL)
    client.close()
    assert got == want
    assert run.counters.sessions_opened == 2  # the first, then one replay on another replica


def test_heartbeats_keep_an_idle_stream_open(tiny_dir, balancer):
    """Idle for three times the balancer's timeout: with heartbeats the stream lives, without it is cut."""
    fp = coexit.load(tiny_dir).fingerprint
    link = CloudLink(balancer.address)
    try:
        beating, _ = _open(link, "beat", fp, heartbeat_s=IDLE_S / 4)
        silent, _ = _open(link, "silent", fp)
        time.sleep(3 * IDLE_S)
        ok = beating.request(pb.SessionRequest(append=pb.AppendRequest(first_position=0, token_ids=[1, 5, 9],
                                                                       want_token=True)))
        assert ok.appended.has_token and beating.heartbeats >= 3
        with pytest.raises(CloudError):
            silent.request(pb.SessionRequest(append=pb.AppendRequest(first_position=0, token_ids=[1, 5, 9],
                                                                     want_token=True)))
        beating.close()
    finally:
        link.close()


@pytest.fixture
def haproxy(request, replicas):
    if not installed("haproxy"):
        pytest.skip("haproxy is not installed (`make setup` installs it from Debian's packages as root)")
    for r in replicas:
        if r.proc.poll() is not None:
            r.start()
    with tempfile.TemporaryDirectory() as tmp:
        b = Balancer("haproxy", [(r.port, r.health) for r in replicas], Path(tmp), IDLE_S)
        try:
            yield b
        finally:
            b.close()


def test_haproxy_reload_keeps_open_streams(tiny_dir, haproxy):
    fp = coexit.load(tiny_dir).fingerprint
    link = CloudLink(haproxy.address)
    try:
        stream, _ = _open(link, "reload", fp)
        haproxy.reload()
        reply = stream.request(pb.SessionRequest(append=pb.AppendRequest(first_position=0, token_ids=[1, 5],
                                                                         want_token=True)))
        assert reply.appended.has_token
        stream.close()
        fresh, _ = _open(link, "after-reload", fp)  # the new process serves new streams
        fresh.close()
    finally:
        link.close()


def test_haproxy_keeps_moved_sessions_when_a_replica_returns(tiny_dir, replicas, haproxy):
    """A session rebuilt on another replica stays there when the dead replica comes back; new keys reach it."""
    fp = coexit.load(tiny_dir).fingerprint
    link = CloudLink(haproxy.address)
    try:
        before = _sessions(replicas)
        stream, opened = _open(link, "mover", fp)
        home = _home(replicas, before)
        home.stop(signal.SIGKILL)
        stream.cancel()
        moved, rebuilt = _resume(link, "mover", fp, opened.session_id)  # what the edge does: resume or open
        assert not rebuilt.resumed and rebuilt.session_id != opened.session_id  # its KV died with its replica
        moved.cancel()
        home.start()
        assert wait_until(lambda: _up(haproxy, home))
        again, reply = _resume(link, "mover", fp, rebuilt.session_id)
        assert reply.resumed and reply.session_id == rebuilt.session_id  # still routed to where it was rebuilt
        again.close()
        before = home.gauge("coexit_sessions")
        streams = [_open(link, f"new-{i}", fp)[0] for i in range(12)]
        assert home.gauge("coexit_sessions") > before  # new sessions reach the returned replica
        for s in streams:
            s.close()
    finally:
        link.close()


def _up(balancer: Balancer, replica: Replica) -> bool:
    """The returned replica answers its health port, and the balancer has had time to see it (rise 2 x 200 ms)."""
    try:
        with socket.create_connection(("127.0.0.1", replica.health), timeout=1):
            pass
    except OSError:
        return False
    time.sleep(1.0)
    return True


def test_haproxy_stops_sending_to_a_draining_replica(tiny_dir, replicas, haproxy):
    """SIGTERM on a replica: its health port turns 503, HAProxy takes it out, and new sessions go elsewhere, while
    the generation it was serving finishes (its drain grace) or moves, with the full model's tokens."""
    full = coexit.load(tiny_dir)
    ids = full.tokenizer.encode("def add(a, b):", add_bos=True)
    want = generate_full(full, ids, 12)
    client = EdgeClient(TorchBackend.from_checkpoint(tiny_dir), full.tokenizer, cloud=haproxy.address,
                        mode="lossless", policy=ExitPolicy.never(), draft_always=False)
    before = _sessions(replicas)
    run = client.stream(ids, 12, stop_at_eos=False)
    got, draining = [], None
    for ev in run:
        got.append(ev.token_id)
        if len(got) == 3:
            draining = _home(replicas, before)
            draining.proc.send_signal(signal.SIGTERM)
            assert wait_until(lambda r=draining: _health(r) != 200, 10)
            time.sleep(1.0)  # fall 2 x inter 200 ms
    client.close()
    assert got == want
    fp = full.fingerprint
    link = CloudLink(haproxy.address)
    try:
        for i in range(8):
            s, _ = _open(link, f"drain-{i}", fp)  # every one succeeds: none reaches the draining replica
            s.close()
    finally:
        link.close()
    draining.proc.wait(timeout=30)


def _health(replica: Replica) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{replica.health}/healthz", timeout=2).status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_collaborative_returns_to_the_cloud_after_a_replica_dies(tiny_dir, replicas, haproxy):
    """The issue's scenario: a collaborative generation whose replica dies carries on standalone for a moment, then
    opens a session on another replica (one replay) and its fallbacks go to the cloud again."""
    full = coexit.load(tiny_dir)
    ids = full.tokenizer.encode("def add(a, b):", add_bos=True)
    client = EdgeClient(TorchBackend.from_checkpoint(tiny_dir), full.tokenizer, cloud=haproxy.address,
                        policy=ExitPolicy.never(), retry_s=0.2, deadline_s=2.0)
    before = _sessions(replicas)
    run = client.stream(ids, 40, stop_at_eos=False)
    origins = []
    for ev in run:
        origins.append(ev.origin)
        if len(origins) == 10:
            _home(replicas, before).stop(signal.SIGKILL)
        if len(origins) > 10 and ev.origin == "edge-standalone":
            time.sleep(0.05)  # the user reads on; the retry clock runs
    client.close()
    assert origins[:10] == ["cloud"] * 10
    assert "cloud" in origins[11:] and origins[-1] == "cloud"  # back on the cloud after the outage
    assert run.counters.sessions_opened == 2
