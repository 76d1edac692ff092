"""Benchmark: the cloud engine's host work per tick, with the model taken out.

It drives the real scheduler, plan, input-build and output code of `cloud/engine/` with a runner that does no model
compute: the deep layers' device step is a no-op that takes the same buffers (the CUDA-graph replay on a GPU), the
layers of the general path only do their KV bookkeeping (slot claims), and the heads hand back rows of a fixed
logits table (so sampling, results and replies are real). Sessions are opened through the real SessionManager and
fed through its `submit`, as the gRPC side would; that part is the front end's and is not timed.

Variants, each at 1, 64, 256 and 1,024 sessions (`--sessions`):
  steady  every session sends one decode row per tick; contexts are uniform in [64, 960] positions (block tables of
          4 to 60 blocks of 16), so rows cross block boundaries as they decode; every `--window` ticks all sessions
          are cut back to their prompt outside the timed region, so contexts stay in that range over many ticks.
  churn   the same, and each tick 1-5% of the sessions close and as many new ones open and upload a 16-256 row
          prompt (no sessions at 1). Also printed: a fit of the churn tick's critical path against its new prompts
          and their rows, and its p50 / p99 at the fewest, middle and most prompts a tick.

Per tick it times: schedule (the scheduler's choice of rows), input build (from there up to the launch of the
deep-layer step), outputs (from the step's end: heads, sampling, results, settling the Appends) and reply fan-out
(handing the results to the front ends: the engine's side of `--frontends N`), and reports p50 / p99 in µs. The
host critical path is their sum: the host time between one tick's outputs and the next launch when nothing
overlaps. Also: process CPU per tick, torch (aten) ops dispatched per tick (counted over separate ticks under a
TorchDispatchMode), and the cost per session: the slope b of a least-squares fit a + b·N of the steady critical
path's p50 over the session counts.

The row budget per tick is 7·N + 256 (`--row-budget B`: B, as `coexit serve --rows-per-tick B`; with fewer rows than
sessions they take turns, B a tick), not the server's default 256: every decode row fits, so N sessions ride
every tick, and so do the churn's prompts (3% of N sessions of 136 rows on average: about 4·N rows a tick), so
that a session is answered within a tick or two of its prompt and the mix of prompts and decode rows stays the same
over the run. Sessions are clients that wait for their token: each sends its next row once its last Append was
answered. The KV pool has 1 KV head of dim 8 (host work does not depend on it), the
hidden size is the default model's (384), 8 layers split at 4, and a vocabulary of 256 (sampling's own compute
stays small). One torch thread; the startup heap is frozen as a serving process freezes it (cloud/engine/heap.py),
where the code under test does that.

    python bench/engine_overhead.py [--ticks 10000] [--sessions 1,64,256,1024] [--variants steady,churn]
    PYTHONPATH=/path/to/other/checkout python bench/engine_overhead.py --label baseline   # another version's code
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pickle
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HIDDEN, LAYERS, SPLIT, VOCAB, BLOCK = 384, 8, 4, 256, 16
CTX = (64, 960)  # prompt lengths of steady sessions
PHASES = ("schedule", "build", "outputs", "fanout")


def pct(xs, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def no_compute_model():
    """A model of the benchmark's shape whose layers and heads do no compute (see the module docstring)."""
    from coexit.config import Config
    from coexit.model import EarlyExitLM

    cfg = dataclasses.replace(Config.flavour("tiny"), vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                              num_hidden_layers=LAYERS, num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                              max_position_embeddings=2048).with_exits((2, 4, 6), SPLIT, True, (0.3,) * 3 + (1.0,))
    model = EarlyExitLM(cfg, layers=(SPLIT, LAYERS)).eval()
    table = torch.randn(8192, VOCAB, generator=torch.Generator().manual_seed(0))

    class Bookkeeping(torch.nn.Module):
        """A deep layer of the general path without its compute: the rows' KV slots are claimed, as attention
        would (BatchAttention.attend), and the hidden states come back unchanged."""

        def __init__(self, layer: int) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x, cos, sin, positions, view, fill=None):
            if hasattr(view, "claim"):  # the code's own claim of all rows at once
                view.claim(self.layer)
                return x
            for cache, first, n in view.segments:
                cache.claim(self.layer, first, n)
            return x

    for i in range(SPLIT, LAYERS):
        model.model.layers[str(i)] = Bookkeeping(i)

    def head_logits(layer, hidden):
        lead = hidden.shape[:-1]
        n = math.prod(lead)
        return table[:n].view(*lead, VOCAB)

    model.head_logits = head_logits
    return model


class Clock:
    """Phase stamps within one tick; the no-op device step marks the launch."""

    def __init__(self) -> None:
        self.launch_start = self.launch_end = 0.0
        self.launches = 0

    def device_step(self, *args, **kwargs) -> None:
        self.launches += 1
        t = time.perf_counter()
        if self.launches == 1:
            self.launch_start = t
        self.launch_end = time.perf_counter()


class FanOut:
    """The front ends' side of the wire: a ZeroMQ PULL the engine side PUSHes replies to (drained untimed)."""

    def __init__(self) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind("inproc://replies")
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.SNDHWM, 0)
        self.push.connect("inproc://replies")
        self.frames = 0
        self.replies = 0

    def drain(self) -> None:
        import zmq

        while True:
            try:
                self.pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.frames += 1

    def close(self) -> None:
        self.push.close(0)
        self.pull.close(0)
        self.ctx.term()


class Harness:
    """N sessions on a real engine of the code on sys.path, ticked from this thread."""

    def __init__(self, sessions: int, seed: int, budget: int | None = None) -> None:
        from cloud.engine import engine as engine_mod
        from cloud.engine import graphs as graphs_mod
        from cloud.engine.kv_pool import KVPool
        from cloud.sessions import Limits, SessionManager

        self.model = no_compute_model()
        cfg = self.model.config
        self.clock = Clock()
        graphs_mod.DecodeGraphs._step = lambda _self, *a, **k: self.clock.device_step()
        try:  # the mixed pass's layers (decode rows and prompt chunks together), where the code has one
            from cloud.engine import mixed as mixed_mod

            mixed_mod.MixedStep._layers = lambda _self, h, *a, **k: (self.clock.device_step(), h)[1]
        except ImportError:
            pass
        budget = budget or 7 * sessions + 256
        blocks = (sessions + 64) * (LAYERS - SPLIT) * math.ceil((CTX[1] + 512) / BLOCK) + 64
        self.pool = KVPool(blocks, BLOCK, cfg.num_key_value_heads, cfg.head_dim, torch.float32)
        self.engine = engine_mod.Engine(self.model, self.pool, budget, batch_wait=0.0, static_decode="eager")
        self.engine.stop()  # its thread exits; this harness runs the ticks
        self.manager = SessionManager(self.model, Limits(max_sessions=sessions + 64, block_size=BLOCK,
                                                         rows_per_tick=budget), self.engine)
        self.rng = np.random.default_rng(seed)
        self.rows = torch.randn(4096, HIDDEN)  # decode rows are copied out of it: each Append its own tensor
        self.fan = FanOut()
        self.new_api = hasattr(self.engine, "run_tick")
        if self.new_api:
            from cloud.ipc import PackedReplies

            self.packed = PackedReplies(self.fan.push)
        self.sessions: list = []  # [session, prompt length, decoding, cut back to the prompt when next idle]
        self.rid = 0
        try:  # as a serving process does once it has started, where the code does (cloud/engine/heap.py)
            from cloud.engine.heap import freeze_startup_heap
        except ImportError:
            pass
        else:
            freeze_startup_heap()

    # ---- the front end's work (untimed) ------------------------------------------------------------------
    def _waiter(self, front: int):
        """What answers an Append that wants a token: on the new engine, a packed reply slot for its front end;
        on an engine without one, the per-reply work of cloud/ipc.py's engine process (build the outcome,
        pickle it, send it), called by the engine per finished Append."""
        self.rid += 1
        if self.new_api:
            return self.packed.waiter(b"front-%d" % front, self.rid)
        rid, push, fan = self.rid, self.fan.push, self.fan
        from cloud.backend import AppendOutcome

        def reply(done) -> None:
            if isinstance(done, BaseException):
                push.send_multipart([b"front-%d" % front, pickle.dumps((rid, False, ("NOT_FOUND", str(done))))])
                return
            t = done.token
            out = AppendOutcome(0, layer_tokens=done.layer_tokens, compute_s=done.compute_s,
                                verdicts=[(v.position, v.accepted, v.token_id, v.logprob) for v in done.verdicts],
                                rows_filled=done.rows_filled, queue_s=done.queue_s)
            if t is not None:
                out.has_token, out.token_id, out.logprob, out.exit_layer, out.top = (True, t.token_id, t.logprob,
                                                                                     t.exit_layer, t.top)
            push.send_multipart([b"front-%d" % front, pickle.dumps((rid, True, out))])
            fan.replies += 1

        return reply

    def _submit(self, s, rows, first: int) -> None:
        from cloud.engine.scheduler import Segment

        seg = Segment(first, rows, True, waiter=self._waiter(len(self.sessions) % 4))
        assert self.manager.submit(s, seg)

    def open(self, prompt: int) -> None:
        s = self.manager.open(2048, "fp32", False, False, {})
        self._submit(s, torch.randn(prompt, HIDDEN), 0)
        self.sessions.append([s, prompt, False, False])

    def open_decoding(self, n: int) -> None:
        """Open n sessions with prompts uniform in CTX and serve the prompts in one tick (untimed)."""
        for _ in range(n):
            self.open(int(self.rng.integers(*CTX)))
        budget, self.engine.scheduler.row_budget = self.engine.scheduler.row_budget, 1 << 30
        self.tick()
        self.engine.scheduler.row_budget = budget
        self.fan.drain()

    def close_random(self, k: int) -> None:
        for i in sorted(self.rng.choice(len(self.sessions), size=k, replace=False), reverse=True):
            s = self.sessions.pop(i)[0]
            self.manager.close(s)

    def submit_decode(self) -> None:
        """Each session whose last Append was answered sends its next decode row (a client waits for its token;
        a prompt longer than its share of the row budget takes several ticks). Each row is a tensor of its own, as
        a front end decodes it from its message."""
        for entry in self.sessions:
            s = entry[0]
            if not s.queue:
                self._answered(entry)
                self._submit(s, self.rows[self.rid % 4096][None].clone(), s.expected)

    def reset_contexts(self) -> None:
        """Cut every session back to its prompt (untimed), so contexts stay within CTX over many ticks: now, or,
        for a session with a row queued (sessions take turns when the row budget is below their number), once it
        was answered."""
        with self.engine.lock:
            for entry in self.sessions:
                if entry[2]:
                    entry[3] = True
                    if not entry[0].queue:
                        self._cut(entry)

    @staticmethod
    def _cut(entry) -> None:
        s, prompt = entry[0], entry[1]
        entry[3] = False
        if s.expected > prompt:
            s.runner.truncate(prompt)
            s.expected = prompt

    def _answered(self, entry) -> None:
        """A session's last Append was answered (its prompt, the first time): a cut due is made before its next
        row."""
        entry[2] = True
        if entry[3]:
            self._cut(entry)

    # ---- one tick ---------------------------------------------------------------------------------------------
    def tick(self) -> dict[str, float]:
        self.clock.launches = 0
        if self.new_api:
            ph = self.engine.run_tick(fan_out=self.packed.flush)
            t0, t1, t4, t5, t6 = ph["start"], ph["scheduled"], ph["outputs"], ph["settled"], ph["fanned"]
        else:
            t0, t1, t4, t5, t6 = self._tick_old()
        c = self.clock
        if c.launches:
            t2, t3 = c.launch_start, c.launch_end
        else:  # the general path: its build and compute are not separable here; count it all as build
            t2 = t3 = t4
        return dict(schedule=t1 - t0, build=t2 - t1, outputs=(t4 - t3) + (t5 - t4), fanout=t6 - t5)

    def _tick_old(self):
        """The body of the engine thread's loop (cloud/engine/engine.py, Engine._loop) of an engine without
        `run_tick`, with its waiting taken out and time stamps between its phases."""
        e = self.engine
        t0 = time.perf_counter()
        with e.lock:
            tick = e.ticks
            items, failures, applied = e.scheduler.next_tick(e._grow, tick)
            finished = [(seg.waiter, None) for seg in applied]
            for item in items:
                item.session.in_flight = True
            finished += [w for s, seg in failures for w in e._fail(s, seg)]
        t1 = time.perf_counter()
        results = e.runner.run(items) if items else []
        t4 = time.perf_counter()
        with e.lock:
            e.ticks += 1
            finished += e._settle(items, results, None, t4 - t1, tick)
            e._record(items, t4 - t1)
        t5 = time.perf_counter()
        for waiter, outcome in finished:
            if waiter is not None:
                waiter(outcome)
        t6 = time.perf_counter()
        assert not failures, "the pool ran out of blocks"
        return t0, t1, t4, t5, t6

    def close(self) -> None:
        self.fan.close()


def count_ops(h: Harness, ticks: int, step) -> float:
    """Torch ops dispatched inside the engine's ticks (not the front end's submissions), per tick."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    tick = h.tick

    def counted() -> dict:
        with Count():
            return tick()

    h.tick = counted
    try:
        for _ in range(ticks):
            step()
    finally:
        h.tick = tick
    return Count.n / ticks


def run_variant(variant: str, n: int, ticks: int, warmup: int, window: int, seed: int,
                budget: int | None = None) -> dict:
    h = Harness(n, seed, budget)
    try:
        h.open_decoding(n)
        i = 0

        def step(timed: list | None = None) -> None:
            nonlocal i
            i += 1
            if i % window == 0:
                h.reset_contexts()
            k = rows = 0
            if variant == "churn":
                k = int(h.rng.integers(max(1, round(0.01 * n)), max(1, round(0.05 * n)) + 1))
                h.close_random(k)
                for _ in range(k):
                    prompt = int(h.rng.integers(16, 257))
                    h.open(prompt)
                    rows += prompt
            h.submit_decode()
            c0 = time.process_time()
            ph = h.tick()
            ph["cpu"] = time.process_time() - c0
            ph["prompts"], ph["prompt_rows"] = k, rows
            h.fan.drain()
            if timed is not None:
                timed.append(ph)

        for _ in range(warmup):
            step()
        ops = count_ops(h, 20, step)
        timed: list[dict] = []
        wall0 = time.perf_counter()
        for _ in range(ticks):
            step(timed)
        wall = time.perf_counter() - wall0
        out = dict(variant=variant, sessions=n, ticks=ticks, ops=ops, wall=wall)
        for p in (*PHASES, "cpu"):
            xs = [t[p] for t in timed]
            out[p] = (pct(xs, 0.5), pct(xs, 0.99))
        crit = [sum(t[p] for p in PHASES) for t in timed]
        out["critical"] = (pct(crit, 0.5), pct(crit, 0.99))
        out["cpu_mean"] = statistics.fmean(t["cpu"] for t in timed)
        out["crit_mean"] = statistics.fmean(crit)
        if variant == "churn":  # what a tick's new prompts cost: a + b·prompts + c·rows, and the tails by prompts
            ks = np.array([t["prompts"] for t in timed], dtype=float)
            rows = np.array([t["prompt_rows"] for t in timed], dtype=float)
            out["fit"] = np.linalg.lstsq(np.c_[np.ones_like(ks), ks, rows], np.array(crit), rcond=None)[0]
            u, crit_a = np.unique(ks), np.array(crit)
            out["by_prompts"] = {int(k): (pct(crit_a[ks == k], 0.5), pct(crit_a[ks == k], 0.99), int((ks == k).sum()))
                                 for k in (u[0], u[len(u) // 2], u[-1])}
        return out
    finally:
        h.close()


def us(x: float) -> str:
    return f"{x * 1e6:,.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ticks", type=int, default=10_000, help="timed ticks per row, after the warm-up")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--sessions", default="1,64,256,1024")
    ap.add_argument("--variants", default="steady,churn")
    ap.add_argument("--window", type=int, default=256, help="ticks between cutting contexts back to the prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="", help="what code this is (printed)")
    ap.add_argument("--row-budget", type=int, default=None,
                    help="rows per tick (the server's --rows-per-tick, 256 by default there); default 7·N + 256")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import cloud

    root = Path(cloud.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    print(f"# engine_overhead: code {args.label or rev or 'unknown'}; torch {torch.__version__}, 1 thread; "
          f"{args.ticks} timed ticks per row after {args.warmup} warm-up ticks; row budget "
          f"{args.row_budget or '7·N + 256'}; times in µs per tick (p50 / p99)")
    print("| variant | sessions | schedule | input build | outputs | reply fan-out | host critical path | "
          "CPU per tick (mean) | torch ops per tick |")
    print("|---|---|---|---|---|---|---|---|---|")
    counts = [int(s) for s in args.sessions.split(",")]
    steady, churn = {}, {}
    for variant in args.variants.split(","):
        for n in counts:
            if variant == "churn" and n < 2:
                continue
            r = run_variant(variant, n, args.ticks, args.warmup, args.window, args.seed, args.row_budget)
            if variant == "steady":
                steady[n] = r
            else:
                churn[n] = r
            cells = [f"{us(r[p][0])} / {us(r[p][1])}" for p in (*PHASES, "critical")]
            print(f"| {variant} | {n} | {' | '.join(cells)} | {us(r['cpu_mean'])} | {r['ops']:,.0f} |", flush=True)
    if len(steady) >= 2:
        ns = np.array(sorted(steady), dtype=float)
        ys = np.array([steady[int(k)]["critical"][0] for k in ns])
        b, a = np.polyfit(ns, ys, 1)
        print(f"\nsteady host critical path p50 ≈ {a * 1e6:,.0f} µs + {b * 1e6:.2f} µs x sessions "
              f"(least squares over {', '.join(str(int(k)) for k in ns)})")
    for n, r in churn.items():
        a, b, c = r["fit"]
        tails = ", ".join(f"{k} prompts {us(p50)} / {us(p99)} ({m} ticks)" for k, (p50, p99, m) in
                          r["by_prompts"].items())
        print(f"churn {n}: host critical path ≈ {us(a)} µs + {b * 1e6:.1f} µs per new prompt + {c * 1e6:.3f} µs per "
              f"prompt row (least squares over the ticks); p50 / p99 by the tick's new prompts: {tails}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
