"""`coexit serve --tp 2` under torchrun on gloo (CPU): the same greedy tokens through the edge SDK as a one-process
server in collaborative, cloud-only, lossless and propagate modes (and with cloud exits), with prompts chunked over
ticks and several sessions per tick, logits within 5e-5 over a prompt and decode steps, each rank's decoder-layer
weights half of the whole stage's (printed at start), a server idle past its collective timeout still serves, and a
rank that dies takes the server down with a non-zero exit while the edge carries on alone; and with `--frontends 2`,
rank 0 as the engine process behind two front ends: the same tokens, a clean stop, and a lost rank."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import coexit
from cloud.launch import free_port, server_log, start_cloud, torchrun, wait_until
from coexit.exits import ExitPolicy
from coexit.v1 import coexit_pb2 as pb
from coexit.v1.convert import tensor_from_proto, tensor_to_proto
from edge.backends import TorchBackend
from edge.client import EdgeClient
from edge.link import CloudLink
from tests.processes import alive, children

TORCHRUN = torchrun(2)


def start_tp(model_dir, extra: list[str] = ()):
    """`torchrun ... coexit serve --tp 2`; returns (process, address) once rank 0 serves."""
    proc, address = start_cloud(model_dir, extra_args=["--tp", "2", *extra], prefix=TORCHRUN, threads=1)
    return proc, address


def stop(proc) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@pytest.fixture(scope="module")
def model_dir(checkpoint_factory):
    return checkpoint_factory("tiny-tied", seed=3)  # GQA (4 heads, 2 KV heads) and tied embeddings


@pytest.fixture(scope="module")
def servers(model_dir):
    chunks = ["--rows-per-tick", "6"]  # prompts run as chunks over several ticks
    one, one_addr = start_cloud(model_dir, threads=1, extra_args=chunks)
    tp, tp_addr = start_tp(model_dir, chunks)
    yield {"tp1": one_addr, "tp2": tp_addr, "tp_proc": tp}
    stop(one)
    stop(tp)


def generate(model_dir, address, mode, kv_fill="exact", cloud_exits=None, policy=None):
    full = coexit.load(model_dir)
    ids = full.tokenizer.encode("def f(x):\n    return", add_bos=True)
    client = EdgeClient(TorchBackend.from_checkpoint(model_dir), full.tokenizer, cloud=address, mode=mode,
                        kv_fill=kv_fill, cloud_exits=cloud_exits)
    try:
        g = client.generate(ids, 12, policy=policy or ExitPolicy.never(), stop_at_eos=False)
        return g.tokens, g.counters.fallbacks, sorted({e.exit_layer for e in g.events})
    finally:
        client.close()


def test_tokens_equal_a_one_process_server_in_every_mode(model_dir, servers):
    cfg = coexit.read_config(model_dir)
    exit_some = ExitPolicy({e: 0.1 for e in cfg.exit_layers if e <= cfg.split_layer})  # some tokens exit on the edge
    runs = {  # name: (mode, kv_fill, cloud exits, edge policy)
        "collaborative": ("collaborative", "exact", None, exit_some),
        "cloud-only": ("cloud-only", "exact", None, None),
        "lossless": ("lossless", "exact", None, exit_some),
        "propagate": ("collaborative", "propagate", None, exit_some),
        "cloud-exits": ("collaborative", "exact", {4: 0.1}, None),
    }
    got = {"tp1": {}, "tp2": {}}

    def run(server, name):
        mode, fill, exits, policy = runs[name]
        got[server][name] = generate(model_dir, servers[server], mode, fill, exits, policy)

    threads = [threading.Thread(target=run, args=(srv, name)) for srv in ("tp1", "tp2") for name in runs]
    for t in threads:  # all at once: the tp server batches several sessions and modes in its ticks
        t.start()
    for t in threads:
        t.join(300)
    assert set(got["tp2"]) == set(runs)
    assert got["tp2"] == got["tp1"]
    for name in ("collaborative", "propagate"):  # both paths taken: edge exits, and fallbacks with catch-up
        assert 0 < got["tp1"][name][1] < 12, got["tp1"][name]
    assert got["tp1"]["cloud-exits"][2] == [4, 6], got["tp1"]["cloud-exits"]  # the cloud exit and the final head


def test_front_ends_before_rank_0_serve_the_same_tokens_and_stop_cleanly(model_dir, servers, tmp_path):
    """`--tp 2 --frontends 2`: rank 0 is the engine process behind two front-end processes. The same tokens as the
    one-process server, with two streams per mode at once over the front ends' shared port; SIGTERM drains both
    front ends and stops both ranks (none reports a lost rank or a dead front end), and no process is left."""
    with open(tmp_path / "stdout", "wb") as out:  # the ranks' lines
        proc, address = start_cloud(model_dir, extra_args=["--tp", "2", "--rows-per-tick", "6", "--frontends", "2"],
                                    prefix=TORCHRUN, threads=1, stdout=out)
    try:
        ranks = children(proc.pid)  # torchrun's children: the ranks; rank 0's: the front ends
        fronts = [c for r in ranks for c in children(r)]
        assert len(ranks) == 2 and len(fronts) >= 2, (ranks, fronts)  # (+ multiprocessing's resource tracker)
        names = ("collaborative", "cloud-only", "lossless")
        cfg = coexit.read_config(model_dir)
        exit_some = ExitPolicy({e: 0.1 for e in cfg.exit_layers if e <= cfg.split_layer})
        got = {}

        def run(key, addr):
            got[key] = generate(model_dir, addr, key[0], policy=None if key[0] == "cloud-only" else exit_some)

        keys = [(name, server) for name in names for server in ("tp1", "fronts", "fronts-again")]
        threads = [threading.Thread(target=run, args=(key, servers["tp1"] if key[1] == "tp1" else address))
                   for key in keys]
        for t in threads:  # several streams at once: the front ends share them, the ticks batch them
            t.start()
        for t in threads:
            t.join(300)
        assert set(got) == set(keys)
        for name in names:
            assert got[name, "fronts"] == got[name, "tp1"] and got[name, "fronts-again"] == got[name, "tp1"], name
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)  # (torchrun then exits 1 with its own traceback: see stop)
        assert wait_until(lambda: not any(alive(p) for p in [proc.pid, *ranks, *fronts]), 60), "a process outlived it"
        lines = (tmp_path / "stdout").read_text()
        assert "tensor parallel over 2 ranks; 2 front-end process(es)" in lines, lines
        assert not re.search("lost|gone|exited; stopping", lines), lines  # every rank stopped when told to
        assert len(re.findall(r"\[front\] INFO draining", server_log(proc))) == 2  # both front ends drained
    finally:
        stop(proc)


def test_logits_within_5e_5(model_dir, servers):
    full = coexit.load(model_dir)
    ids = torch.tensor([full.tokenizer.encode("for i in range(10):\n    print(i)", add_bos=True)])
    with torch.no_grad():
        rows = full.stage(0, full.config.split_layer)(ids).hidden[0]
    logits = {}
    for server in ("tp1", "tp2"):
        link = CloudLink(servers[server])
        s = link.stream()
        s.request(pb.SessionRequest(open=pb.OpenRequest(fingerprint=full.fingerprint)))
        out = []
        for first, stop_at in ((0, 8), (8, 9), (9, 10), (10, rows.shape[0])):  # a prompt, then decode steps
            reply = s.request(pb.SessionRequest(append=pb.AppendRequest(
                first_position=first, hidden=tensor_to_proto(rows[first:stop_at], "fp32"), want_token=True,
                want_logits=True))).appended
            out.append(tensor_from_proto(reply.logits)[0])
        logits[server] = torch.stack(out)
        link.close()
    # Two ranks sum the row-parallel products in another order than one process: fp32 rounding, seen up to 9.3e-6
    # here (logits up to about 5), and other CPUs' GEMM kernels order their sums differently again. A sharding
    # error (a wrong shard, a missing all-reduce) moves logits by far more than this.
    torch.testing.assert_close(logits["tp2"], logits["tp1"], atol=5e-5, rtol=0)


def test_each_rank_holds_half_the_weights(model_dir):
    """The start-up lines: every rank's deep-layer weights are half of the stage's."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*TORCHRUN, sys.executable, "-m", "coexit.cli", "serve", "--model", str(model_dir),
                             "--port", str(port), "--tp", "2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, got = [], queue.Queue()  # read on a thread: a rank that never prints fails the test, not hangs it

    def read() -> None:
        for line in iter(proc.stdout.readline, ""):
            got.put(line)
        got.put("")  # the output ended

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 120
    pattern = re.compile(r"rank (\d)/2: decoder layers ([\d.]+) MiB of ([\d.]+) MiB")
    try:
        while len(pattern.findall("".join(lines))) < 2:  # (two ranks' lines could share one, were they interleaved)
            try:
                line = got.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if not line:
                break
            lines.append(line)
    finally:
        stop(proc)
    ranks = [m for x in lines for m in pattern.finditer(x)]
    assert all(x.count("rank ") <= 1 for x in lines), "two processes' lines interleaved"
    assert sorted(int(m.group(1)) for m in ranks) == [0, 1], lines
    for m in ranks:
        assert float(m.group(2)) == pytest.approx(float(m.group(3)) / 2, rel=0.02), m.group(0)


def test_an_idle_server_outlives_its_collective_timeout(model_dir):
    """A follower waits for rank 0's next tick in a gloo broadcast, which fails once it has waited --tp-timeout:
    idle for three timeouts, the server still serves (rank 0's heartbeats) and gives the tokens it gave before."""
    proc, address = start_tp(model_dir, ["--tp-timeout", "3"])
    try:
        full = coexit.load(model_dir)
        ids = full.tokenizer.encode("def f(x):", add_bos=True)
        client = EdgeClient(TorchBackend.from_checkpoint(model_dir), full.tokenizer, cloud=address,
                            mode="collaborative", deadline_s=10.0)
        first = client.generate(ids, 4, policy=ExitPolicy.never(), stop_at_eos=False)
        assert first.counters.fallbacks == 4
        time.sleep(9)
        assert proc.poll() is None, "the server stopped while idle"
        again = client.generate(ids, 4, policy=ExitPolicy.never(), stop_at_eos=False)
        assert again.counters.fallbacks == 4 and again.tokens == first.tokens
        assert proc.poll() is None
    finally:
        stop(proc)


@pytest.mark.parametrize("extra", [[], ["--frontends", "2"]], ids=["one-process-rank-0", "front-ends"])
def test_a_lost_rank_stops_the_server_and_the_edge_carries_on(model_dir, extra):
    proc, address = start_tp(model_dir, extra)
    try:
        full = coexit.load(model_dir)
        ids = full.tokenizer.encode("x = 1", add_bos=True)
        client = EdgeClient(TorchBackend.from_checkpoint(model_dir), full.tokenizer, cloud=address,
                            mode="collaborative", deadline_s=2.0, retry_s=0.2)
        first = client.generate(ids, 4, policy=ExitPolicy.never(), stop_at_eos=False)
        assert first.counters.fallbacks == 4
        ranks = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                text=True).stdout.split()]  # torchrun's children: the ranks
        assert len(ranks) == 2, ranks
        fronts = [c for r in ranks for c in children(r)]  # (with --frontends: rank 0's children)
        follower = max(ranks)  # started second: rank 1 (either rank's loss must stop the server)
        os.kill(follower, signal.SIGKILL)
        assert proc.wait(60) != 0, "the server did not exit non-zero when a rank was lost"
        assert wait_until(lambda: not any(map(alive, fronts)), 30), "a front end outlived the server"
        after = client.generate(ids, 4, policy=ExitPolicy.never(), stop_at_eos=False)  # the edge alone
        assert len(after.tokens) == 4 and after.counters.standalone == 4
        client.close()
    finally:
        stop(proc)
