"""Benchmark: S concurrent sessions of hidden-state traffic against a real `coexit serve` process.

Writes a random checkpoint of a Llama shape (`--shape default`: the bundled default model's, 8 layers d 384 split
4; `--shape tinyllama`: 22 layers d 2048 split 11, served in bf16 on a GPU), starts `coexit serve` on it, and
drives S sessions from `--clients` load-generator processes (grpc.aio, many streams each). Each session uploads a
`--prompt`-row prompt, then runs `--steps` decode steps (one split-layer row up, one token down). Printed per S:
decode tokens/s over all sessions, client step p50/p99, server compute per step p50/p99 (the replies'
compute_us), and from the engine's Prometheus metrics the mean queue wait (arrival to first tick), tick time and
sessions per tick; client step minus queue wait and compute is message handling and the network. And the ratio of
tokens/s to a plain batched decode step of the same layers with batch S (eager on a CPU, under a CUDA graph on a
GPU), timed right before and right after each row's load, the server idle: the baseline is their mean, and both
are printed, since a machine whose speed drifts by 10-20% within a minute would otherwise move the ratio as much.

    python bench/cloud_load.py [--shape default] [--sessions 1,16,64,256] [--clients 2] [--steps 64]
    python bench/cloud_load.py --server-root /path/to/older/checkout   # the same load against another version
    python bench/cloud_load.py --tp 2   # `coexit serve --tp 2` under torchrun (one rank per GPU on a GPU host)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing as mp
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

SHAPES = {  # name: config overrides of the tiny flavour (head_dim too: the flavour's own is 16)
    "default": dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                    exits=((2, 4, 6), 4)),
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
                      exits=((6, 11, 16), 11)),
}


def write_shape(name: str, out: Path) -> Path:
    """A random checkpoint of the named shape (bf16 for the TinyLlama one, as it is served on a GPU)."""
    from coexit.checkpoint import save
    from coexit.config import Config
    from coexit.tiny import SAMPLE_TEXT, random_model, train_bpe

    kw = dict(SHAPES[name])
    exits, split = kw.pop("exits")
    cfg = dataclasses.replace(Config.flavour("tiny"), **kw).with_exits(exits, split, True, (0.3,) * len(exits) + (1.0,))
    big = cfg.hidden_size > 1024
    model = random_model(cfg, seed=0, std=0.02 if big else 0.2)
    if big:
        model = model.to(torch.bfloat16)
    return save(model, out, tokenizer=train_bpe(SAMPLE_TEXT * 4, cfg.vocab_size))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


# ---- the load generator (one process drives many sessions) ---------------------------------------------------
def _client_proc(address, fingerprint, hidden, n_sessions, prompt, steps, barrier, out_q):
    torch.set_num_threads(1)
    import grpc

    from coexit.v1 import coexit_pb2 as pb
    from coexit.v1 import coexit_pb2_grpc as pb_grpc
    from coexit.v1.convert import tensor_to_proto
    from coexit.wire import SESSION_KEY_HEADER

    prompt_t = tensor_to_proto(torch.randn(prompt, hidden), "fp16")
    row_t = tensor_to_proto(torch.randn(1, hidden), "fp16")

    async def session(stub, ready: asyncio.Event, opened: list):
        call = stub.Session(metadata=((SESSION_KEY_HEADER, secrets.token_hex(12)),))  # a balancer's stickiness key
        await call.write(pb.SessionRequest(open=pb.OpenRequest(fingerprint=fingerprint, encoding=pb.FP16,
                                                               max_length=prompt + steps + 1)))
        await call.read()
        await call.write(pb.SessionRequest(append=pb.AppendRequest(first_position=0, hidden=prompt_t,
                                                                   want_token=True)))
        await call.read()
        opened.append(1)
        await ready.wait()
        lat, server = [], []
        for i in range(steps):
            t0 = time.perf_counter()
            await call.write(pb.SessionRequest(append=pb.AppendRequest(first_position=prompt + i, hidden=row_t,
                                                                       want_token=True)))
            reply = await call.read()
            lat.append(time.perf_counter() - t0)
            server.append(reply.appended.compute_us / 1e6)
        await call.write(pb.SessionRequest(close=pb.CloseRequest()))
        await call.done_writing()  # Close is the last message (behind a proxy the reply needs the half-close)
        await call.read()
        return lat, server

    async def main():
        async with grpc.aio.insecure_channel(address) as ch:
            stub = pb_grpc.CoexitStub(ch)
            ready, opened = asyncio.Event(), []
            tasks = [asyncio.create_task(session(stub, ready, opened)) for _ in range(n_sessions)]
            while len(opened) < n_sessions:
                failed = [t for t in tasks if t.done() and t.exception() is not None]
                if failed:
                    raise failed[0].exception()
                await asyncio.sleep(0.01)
            await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
            t0 = time.perf_counter()
            ready.set()
            results = await asyncio.gather(*tasks)
            t1 = time.perf_counter()
        lat = [x for r in results for x in r[0]]
        server = [x for r in results for x in r[1]]
        out_q.put((t0, t1, lat, server))

    asyncio.run(main())


def metrics(port: int) -> dict[str, float]:
    if not port:
        return {}
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(coexit_\w+) ([0-9.e+-]+)$", text, re.M)}


def run_load(address, fingerprint, hidden, sessions, clients, prompt, steps, metrics_port):
    clients = max(1, min(clients, sessions))
    ctx = mp.get_context("spawn")
    barrier, out_q = ctx.Barrier(clients + 1), ctx.Queue()
    per = [sessions // clients + (i < sessions % clients) for i in range(clients)]
    procs = [ctx.Process(target=_client_proc, args=(address, fingerprint, hidden, n, prompt, steps, barrier, out_q))
             for n in per]
    for p in procs:
        p.start()
    barrier.wait(timeout=600)
    before = metrics(metrics_port)
    results = [out_q.get(timeout=900) for _ in procs]
    after = metrics(metrics_port)
    for p in procs:
        p.join()
    t0, t1 = min(r[0] for r in results), max(r[1] for r in results)
    lat = [x for r in results for x in r[2]]
    server = [x for r in results for x in r[3]]
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    ticks = d.get("coexit_tick_seconds_count", 0)
    return dict(tok_s=len(lat) / (t1 - t0), p50=pct(lat, .5), p99=pct(lat, .99), s50=pct(server, .5),
                s99=pct(server, .99), tick=d["coexit_tick_seconds_sum"] / ticks if ticks else float("nan"),
                batch=d["coexit_tick_sessions_sum"] / ticks if ticks else float("nan"),  # no metrics: --target
                queue=d["coexit_queue_wait_seconds_sum"] / d["coexit_queue_wait_seconds_count"]
                if d.get("coexit_queue_wait_seconds_count") else float("nan"))


# ---- the plain batched step (the bound) ----------------------------------------------------------------------
@torch.no_grad()
def plain_step(model_dir: Path, batch: int, ctx: int, device: str, dtype, gap: float = 0.0) -> float:
    """Seconds for one decode step of `batch` sequences through layers [split, L) with a contiguous KV cache of
    `ctx` positions and the final head on every row (CUDA graph on a GPU, eager otherwise); `gap` seconds idle
    between the timed steps (a server's ticks wait for the replies' round trip)."""
    import coexit

    cfg = coexit.read_config(model_dir)
    split, L = cfg.split_layer, cfg.num_hidden_layers
    model = coexit.load(model_dir, layers=(split, L), dtype=dtype, device=device)
    cache = model.new_cache(batch_size=batch, max_len=ctx + 64)
    stage = model.stage(split, L)
    stage(torch.randn(batch, ctx, cfg.hidden_size, device=device, dtype=dtype), cache=cache, head_rows="last")
    x = torch.randn(batch, 1, cfg.hidden_size, device=device, dtype=dtype)

    def step():
        cache.truncate(ctx)
        return stage(x, positions=ctx, cache=cache, head_rows="last").logits  # an int: no host sync, capturable

    for _ in range(3):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    else:
        run = step
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if gap:
            time.sleep(gap)
    return statistics.median(times)


def main() -> int:
    from cloud.server import SERVE_DTYPES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="default")
    ap.add_argument("--model", help="serve this checkpoint instead of a random one of --shape")
    ap.add_argument("--sessions", default="1,16,64,256")
    ap.add_argument("--clients", type=int, default=2, help="load-generator processes")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64, help="decode steps per session")
    ap.add_argument("--server-threads", type=int, default=1, help="torch threads of the server (CPU)")
    ap.add_argument("--plain-gap-ms", type=float, default=0.0,
                    help="also time the plain step with this much idle time between steps, and print it beside the "
                         "engine tick (the ratio stays against the back-to-back step): a closed-loop server's ticks "
                         "each follow the replies' round trip, and some machines run a step after a few idle "
                         "milliseconds markedly slower")
    ap.add_argument("--frontends", type=int, default=0,
                    help="serve with this many gRPC front-end processes and one engine process (0: one process)")
    ap.add_argument("--tp", type=int, default=1,
                    help="serve with `coexit serve --tp N` under torchrun (N ranks of the deep layers)")
    ap.add_argument("--dtype", choices=SERVE_DTYPES, default="auto",
                    help="`coexit serve --dtype` (auto: bf16 on a GPU, fp32 on a CPU); the plain step uses the same")
    ap.add_argument("--serve-args", default="", help="more `coexit serve` flags, e.g. \"--batch-wait 0\"")
    ap.add_argument("--server-root", help="run `coexit serve` from this checkout instead (a baseline)")
    ap.add_argument("--target", metavar="HOST:PORT",
                    help="drive this running server or balancer instead of starting one (it must serve --model or "
                         "the --shape's random weights: only the fingerprint and sizes are read from it); "
                         "the engine columns need --target-metrics-port")
    ap.add_argument("--target-metrics-port", type=int, default=0, help="the --target server's --metrics-port")
    args = ap.parse_args()

    from cloud.launch import free_port, start_cloud, torchrun
    from edge.link import CloudLink

    on_gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    if args.dtype != "auto":
        dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.server_threads)  # the plain step gets the server's compute threads
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else write_shape(args.shape, Path(tmp) / args.shape)
        counts = [int(s) for s in args.sessions.split(",")]
        mport = free_port()
        extra = ["--max-sessions", str(max(counts) + 8), "--kv-budget-mib", "4096" if on_gpu else "1024",
                 *args.serve_args.split(), *(["--dtype", args.dtype] if args.dtype != "auto" else [])]
        if args.target:
            mport = args.target_metrics_port
        else:  # (an older --server-root takes the same flags)
            extra += ["--metrics-port", str(mport)]
            if args.frontends:
                extra += ["--frontends", str(args.frontends)]
        if args.tp > 1:
            extra += ["--tp", str(args.tp)]
        proc, address = (None, args.target) if args.target else \
            start_cloud(model_dir, extra_args=extra, threads=args.server_threads, cwd=args.server_root,
                        prefix=torchrun(args.tp) if args.tp > 1 else None)
        try:
            link = CloudLink(address)
            info = link.info()
            link.close()
            gap_ms = args.plain_gap_ms
            if args.prompt + args.steps + 1 > info.limits.max_length:
                raise SystemExit(f"--prompt + --steps exceed the model's {info.limits.max_length} positions")
            print(f"shape {args.shape}: {info.num_layers} layers, d {info.hidden_size}, split {info.split_layer}; "
                  f"{device} {str(dtype).removeprefix('torch.')}, {args.server_threads} compute thread(s); "
                  f"prompt {args.prompt}, {args.steps} decode steps "
                  f"per session, {args.clients} client processes; server "
                  f"{f'{args.frontends} front end(s) + engine process, ' if args.frontends else ''}"
                  f"{f'tensor parallel over {args.tp} ranks, ' if args.tp > 1 else ''}"
                  f"{'' if args.frontends or args.tp > 1 else 'one process, '}"
                  f"{args.target or args.server_root or 'this checkout'}")
            gap = gap_ms / 1e3
            idle = f" plain, {gap_ms:g} ms idle between steps | engine tick / it |" if gap else ""
            print("| sessions | tokens/s | client p50 | client p99 | server p50 | server p99 | queue wait | "
                  "engine tick | sessions/tick | plain step | plain tokens/s | ratio | plain before / after |" + idle)
            print("|---" * (13 + 2 * bool(gap)) + "|")

            def timed(batch: int) -> tuple[float, float]:  # back to back (the baseline), and with idle time
                ctx = args.prompt + args.steps // 2
                return (plain_step(model_dir, batch, ctx, device, dtype),
                        plain_step(model_dir, batch, ctx, device, dtype, gap) if gap else 0.0)

            for s in counts:
                before, before_idle = timed(s)
                r = run_load(address, info.fingerprint, info.hidden_size, s, args.clients, args.prompt, args.steps,
                             mport)
                after, after_idle = timed(s)
                plain, plain_idle = (before + after) / 2, (before_idle + after_idle) / 2
                plain_tok = s / plain
                print(f"| {s} | {r['tok_s']:.0f} | {r['p50'] * 1e3:.2f} ms | {r['p99'] * 1e3:.2f} ms | "
                      f"{r['s50'] * 1e3:.2f} ms | {r['s99'] * 1e3:.2f} ms | {r['queue'] * 1e3:.2f} ms | "
                      f"{r['tick'] * 1e3:.2f} ms | "
                      f"{r['batch']:.1f} | {plain * 1e3:.2f} ms | {plain_tok:.0f} | "
                      f"{r['tok_s'] / plain_tok:.1%} | {before * 1e3:.2f} / {after * 1e3:.2f} ms |" +
                      (f" {plain_idle * 1e3:.2f} ms | {r['tick'] / plain_idle:.2f}x |" if gap else ""), flush=True)
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
