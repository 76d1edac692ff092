"""Soak: N concurrent sessions against a real `coexit serve` for M minutes. Each session worker loops: open,
upload a prompt of split-layer rows, decode some tokens, then close, or (with probability --abandon) drop the
stream without Close, leaving a detached session for the idle TTL to reclaim. Every few seconds it records the
server's RSS, KV blocks in use and sessions (from its metrics), and at the end it plots them (PNG) and checks
that RSS stayed within 5% after warm-up and that every KV block came back to the pool.

    python bench/soak.py [--sessions 64] [--minutes 10] [--abandon 0.5] [--out bench/results/soak.png]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "coexit-code-small"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


async def worker(stub, fingerprint, hidden, rng, stats, stop_at):
    from coexit.v1 import coexit_pb2 as pb
    from coexit.v1.convert import tensor_to_proto

    while time.monotonic() < stop_at:
        call = stub.Session()
        try:
            await call.write(pb.SessionRequest(open=pb.OpenRequest(fingerprint=fingerprint, encoding=pb.FP16,
                                                                   max_length=128)))
            await call.read()
            n = rng.randint(8, 48)
            await call.write(pb.SessionRequest(append=pb.AppendRequest(
                first_position=0, hidden=tensor_to_proto(torch.randn(n, hidden), "fp16"), want_token=True)))
            await call.read()
            for i in range(rng.randint(2, 16)):
                await call.write(pb.SessionRequest(append=pb.AppendRequest(
                    first_position=n + i, hidden=tensor_to_proto(torch.randn(1, hidden), "fp16"), want_token=True)))
                reply = await call.read()
                stats["tokens"] += reply.appended.has_token
            if rng.random() < stats["abandon"]:
                call.cancel()  # no Close: the session stays detached until its idle TTL
                stats["abandoned"] += 1
            else:
                await call.write(pb.SessionRequest(close=pb.CloseRequest()))
                await call.read()
                await call.done_writing()
                stats["closed"] += 1
        except Exception as exc:  # count, keep going: the soak is about the server surviving
            stats["errors"] += 1
            stats["last_error"] = repr(exc)[:200]
            call.cancel()


async def drive(address, fingerprint, hidden, sessions, seconds, abandon, seed, stats):
    import grpc

    from coexit.v1 import coexit_pb2_grpc as pb_grpc

    stats.update(tokens=0, abandoned=0, closed=0, errors=0, abandon=abandon)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.CoexitStub(ch)
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*[worker(stub, fingerprint, hidden, random.Random(seed + i), stats, stop_at)
                               for i in range(sessions)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL) if DEFAULT_MODEL.exists() else None)
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--abandon", type=float, default=0.5, help="share of sessions dropped without Close")
    ap.add_argument("--idle-ttl", type=float, default=2.0)
    ap.add_argument("--warmup", type=float, default=0.1, help="share of the run before RSS is compared")
    ap.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/soak.png")
    args = ap.parse_args()

    import threading

    from cloud.launch import free_port, start_cloud
    from coexit.tiny import make_checkpoint
    from edge.link import CloudLink

    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model or make_checkpoint(f"{tmp.name}/tiny", "tiny")
    mport = free_port()
    proc, address = start_cloud(model_dir, extra_args=["--metrics-port", str(mport), "--idle-ttl", str(args.idle_ttl),
                                                       "--max-sessions", str(4 * args.sessions + 64)])
    info = CloudLink(address).info()
    stats: dict = {}
    seconds = args.minutes * 60
    load = threading.Thread(target=lambda: asyncio.run(drive(address, info.fingerprint, info.hidden_size,
                                                             args.sessions, seconds, args.abandon, args.seed, stats)))
    t0 = time.monotonic()
    load.start()
    samples = []  # (t, rss MiB, blocks used, sessions)
    try:
        while load.is_alive():
            samples.append((time.monotonic() - t0, rss_mib(proc.pid), metric(mport, "coexit_kv_blocks_used"),
                            metric(mport, "coexit_sessions")))
            time.sleep(args.every)
        load.join()
        time.sleep(args.idle_ttl * 2 + 1)  # detached sessions expire
        end = (time.monotonic() - t0, rss_mib(proc.pid), metric(mport, "coexit_kv_blocks_used"),
               metric(mport, "coexit_sessions"))
        samples.append(end)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)
    warm = [s for s in samples if s[0] >= args.warmup * seconds]
    base = warm[0][1]
    peak = max(s[1] for s in warm)
    drift = max(abs(s[1] - base) for s in warm) / base
    ok = alive and drift <= 0.05 and end[2] == 0 and end[3] == 0
    print(f"{args.sessions} session workers for {args.minutes:g} min: {stats['closed']} closed, "
          f"{stats['abandoned']} abandoned, {stats['tokens']} tokens, {stats['errors']} client errors"
          + (f" (last: {stats.get('last_error')})" if stats["errors"] else ""))
    print(f"server RSS after warm-up: {base:.0f} MiB, peak {peak:.0f} MiB, final {end[1]:.0f} MiB, max drift "
          f"{drift:.1%} (goal <= 5%); at the end: {end[2]:.0f} KV blocks in use, {end[3]:.0f} sessions; "
          f"server alive: {alive}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        ts = [s[0] / 60 for s in samples]
        ax.plot(ts, [s[1] for s in samples], color="tab:blue", label="server RSS (MiB)")
        ax.set_xlabel("minutes")
        ax.set_ylabel("RSS (MiB)", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(ts, [s[2] for s in samples], color="tab:orange", label="KV blocks in use")
        ax2.set_ylabel("KV blocks in use", color="tab:orange")
        ax.set_title(f"soak: {args.sessions} sessions, {stats['abandoned']} abandoned")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(args.out, dpi=100)
        print(f"plot: {args.out}")
    except ImportError:
        print("matplotlib is not installed: no plot")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
