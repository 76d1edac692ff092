"""Benchmark: how long a burst of new sessions waits for its first token when they outnumber the row budget.

A burst is what a replica sees after a neighbour fails, or after it restarts: hundreds of edge clients reconnect
at once and each replays its history (a prompt of a few hundred rows) before it can decode again. With more
sessions ready than `--rows-per-tick` has rows, the scheduler decides who waits. This drives the real scheduler,
engine and replies of the code on sys.path with bench/engine_overhead.py's harness (no model compute), and counts
ticks, not seconds: how many ticks after the burst each new session's prompt is answered (its time to first
token, in ticks), and what the sessions that were already decoding got meanwhile.

Scenarios (each `--burst` new sessions with prompts uniform in `--prompt` rows, under `--row-budget`):
  alone    the burst, with nothing else on the server;
  beside   the burst while `--decoding` sessions decode (each sends its next row once answered);
  deadline the burst alone, its clients giving up after `--deadline` ticks without a token, as an edge client's
           per-message deadline (5 s by default) does: the stream ends, the server drops the session, and the
           client reconnects and replays its whole prompt, queued anew (at most `--limit` ticks).
A new session whose prompt was answered decodes from then on, as its client would.

Printed per scenario: the burst's ticks to first token (p10, p25, p50, mean, p90, max), how many were answered and
after how many ticks, the decoding sessions' tokens per tick over those ticks and the longest any of them waited
for a token, how many clients gave up (the deadline scenario) and the rows computed for them for nothing, and the
engine's mean host time a tick (no model compute: scheduling, input build, outputs, replies).

    python bench/burst.py [--burst 300] [--prompt 64,512] [--decoding 128] [--row-budget 256]
    PYTHONPATH=/path/to/other/checkout python bench/burst.py --label baseline   # another version's code
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_overhead as eo  # noqa: E402


def run(burst: int, prompt: tuple[int, int], decoding: int, budget: int, seed: int, deadline: int | None = None,
        limit: int = 5000) -> dict:
    """One scenario. With `deadline` (ticks), a new session not answered within it gives up, as an edge client
    whose deadline passed does: its stream ends (the server drops the session) and it reconnects and replays the
    same prompt, queued anew. Stops once every new session was answered, or after `limit` ticks."""
    h = eo.Harness(burst + decoding, seed, budget)
    try:
        for _ in range(decoding):
            h.open(int(h.rng.integers(*eo.CTX)))
        if decoding:
            h.engine.scheduler.row_budget = 1 << 30
            h.tick()  # the decoding sessions' prompts, in one tick
            h.engine.scheduler.row_budget = budget
            h.fan.drain()
            for _ in range(4):  # they decode before the burst comes
                h.submit_decode()
                h.tick()
                h.fan.drain()
        for _ in range(burst):
            h.open(int(h.rng.integers(prompt[0], prompt[1] + 1)))
        waiting = {id(e): (e, 0) for e in h.sessions[decoding:]}  # a new session not answered yet: (entry, opened)
        answered: list[int] = []  # ticks from the burst to each client's first token
        tokens, gap, since, ticks, retries, rows, host = 0, 0, [0] * decoding, 0, 0, 0, 0.0
        while waiting and ticks < limit:
            sent = [not h.sessions[i][0].queue for i in range(decoding)]  # answered since their last row
            tokens += sum(sent)
            since = [0 if a else w + 1 for a, w in zip(sent, since)]
            gap = max([gap, *since])
            if ticks % 256 == 255:  # contexts stay within max_length however long the scenario runs
                h.reset_contexts()
            h.submit_decode()
            t0 = time.perf_counter()
            h.tick()
            host += time.perf_counter() - t0
            h.fan.drain()
            ticks += 1
            for key, (e, opened) in list(waiting.items()):
                if not e[0].queue:
                    answered.append(ticks)
                    del waiting[key]
                elif deadline is not None and ticks - opened >= deadline:  # gives up; replays it, queued anew
                    rows += e[1] - (e[0].queue[0].n - e[0].queue[0].done_rows)  # computed for nothing
                    h.sessions.remove(e)
                    h.manager.close(e[0])
                    h.open(e[1])
                    del waiting[key]
                    waiting[id(h.sessions[-1])] = (h.sessions[-1], ticks)
                    retries += 1
        w = np.array(answered or [np.nan], dtype=float)
        return dict(p10=np.percentile(w, 10), p25=np.percentile(w, 25), p50=np.percentile(w, 50),
                    mean=statistics.fmean(w), p90=np.percentile(w, 90), max=w.max(), answered=len(answered),
                    ticks=ticks, tokens=tokens / ticks if decoding else None, gap=gap + 1 if decoding else None,
                    retries=retries, wasted=rows, host=host / ticks)
    finally:
        h.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=300, help="new sessions arriving at once")
    ap.add_argument("--prompt", default="64,512", help="their prompts' rows: uniform in [a, b]")
    ap.add_argument("--decoding", type=int, default=128, help="sessions decoding when the burst comes (beside)")
    ap.add_argument("--row-budget", type=int, default=256, help="rows per tick (coexit serve --rows-per-tick)")
    ap.add_argument("--deadline", type=int, default=300,
                    help="ticks a client waits before it gives up and replays (the deadline scenario)")
    ap.add_argument("--limit", type=int, default=3000, help="ticks at most per scenario")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="", help="what code this is (printed)")
    args = ap.parse_args()
    lo, hi = map(int, args.prompt.split(","))
    print(f"# {args.label or 'this checkout'}: {args.burst} new sessions, prompts of {lo}-{hi} rows, "
          f"row budget {args.row_budget}")
    print("| scenario | ticks to first token p10 / p25 / p50 / mean / p90 / max | answered | after "
          "| decoding: tokens a tick / longest wait | gave up (rows computed for nothing) | host time a tick |")
    print("|---|---|---|---|---|---|---|")
    for name, decoding, deadline in (("alone", 0, None), ("beside", args.decoding, None),
                                     (f"deadline {args.deadline}", 0, args.deadline)):
        r = run(args.burst, (lo, hi), decoding, args.row_budget, args.seed, deadline, args.limit)
        dec = f"{decoding} sessions: {r['tokens']:.1f} / {r['gap']} ticks" if decoding else "-"
        print(f"| {name} | {r['p10']:.0f} / {r['p25']:.0f} / {r['p50']:.0f} / {r['mean']:.1f} / {r['p90']:.0f} / "
              f"{r['max']:.0f} | {r['answered']} | {r['ticks']} ticks | {dec} | {r['retries']} ({r['wasted']:,}) "
              f"| {r['host'] * 1e6:,.0f} µs |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
