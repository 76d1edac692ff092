"""Benchmark: how long new sessions wait for their first token when the rows wanted outnumber the row budget.

A burst is what a replica sees after a neighbour fails, or after it restarts: hundreds of edge clients reconnect
at once and each replays its history (a prompt of a few hundred rows) before it can decode again. With more
sessions ready than `--rows-per-tick` has rows, the scheduler decides who waits. This drives the real scheduler,
engine and replies of the code on sys.path with bench/engine_overhead.py's harness (no model compute), and counts
ticks, not seconds: how many ticks after the burst each new session's prompt is answered (its time to first
token, in ticks), and what the sessions that were already decoding got meanwhile.

Scenarios (each `--burst` new sessions with prompts uniform in `--prompt` rows, under `--row-budget`):
  alone    the burst, with nothing else on the server;
  beside   the burst while `--decoding` sessions decode (each sends its next row once answered);
  one every 4 ticks beside B - B/16
           a third as many new sessions, one every 4 ticks, each closing once answered, while sessions just under
           the row budget B in number decode: what the decode rows leave is less than the prompts want.
In the first two, a new session whose prompt was answered decodes from then on, as its client would.

Printed per scenario: the burst's ticks to first token (p10, p25, p50, mean, p90, max), the share answered within
`--deadline` ticks (an edge client whose deadline passes, 5 s by default, emits that token from its own layers
and resumes its session later: a tick of a CPU server takes 10-100 ms, so 300 ticks are 3-30 s), the ticks until
every prompt was answered, the decoding sessions' tokens per tick over those ticks and the longest any of them
waited for a token, and the engine's mean host time a tick (no model compute: scheduling, input build, outputs,
replies).

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


def run(burst: int, prompt: tuple[int, int], decoding: int, budget: int, seed: int, every: int = 0) -> dict:
    """One scenario; with `every`, the new sessions come one every `every` ticks instead of at once, and each
    closes once answered (so the decoding sessions stay as many)."""
    h = eo.Harness(burst + decoding, seed, budget)
    try:
        if decoding:
            h.open_decoding(decoding)
            for _ in range(4):  # they decode before the burst comes
                h.submit_decode()
                h.tick()
                h.fan.drain()
        for _ in range(0 if every else burst):
            h.open(int(h.rng.integers(prompt[0], prompt[1] + 1)))
        waiting = h.sessions[decoding:]  # the new sessions not answered yet
        opened = dict.fromkeys(map(id, waiting), 0)  # the tick each came
        answered: list[int] = []  # ticks from its arrival to each one's first token
        tokens, gap, since, ticks, host, left = 0, 0, [0] * decoding, 0, 0.0, burst if every else 0
        while waiting or left:
            if left and ticks % every == 0:
                h.open(int(h.rng.integers(prompt[0], prompt[1] + 1)))
                waiting.append(h.sessions[-1])
                opened[id(h.sessions[-1])] = ticks
                left -= 1
            sent = [not h.sessions[i][0].queue for i in range(decoding)]  # answered since their last row
            tokens += sum(sent)
            since = [0 if a else w + 1 for a, w in zip(sent, since)]
            gap = max([gap, *since])
            if ticks % 256 == 255:  # contexts stay within max_length however long the burst takes
                h.reset_contexts()
            h.submit_decode()
            t0 = time.perf_counter()
            h.tick()
            host += time.perf_counter() - t0
            h.fan.drain()
            ticks += 1
            for e in waiting:
                if not e[0].queue:
                    answered.append(ticks - opened[id(e)])
                    if every:
                        h.sessions.remove(e)
                        h.manager.close(e[0])
            waiting = [e for e in waiting if e[0].queue]
        w = np.array(answered, dtype=float)
        return dict(pct=[np.percentile(w, q) for q in (10, 25, 50)], mean=statistics.fmean(w),
                    p90=np.percentile(w, 90), max=w.max(), answered=w, ticks=ticks,
                    tokens=tokens / ticks if decoding else None, gap=gap + 1 if decoding else None, host=host / ticks)
    finally:
        h.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=300, help="new sessions arriving at once")
    ap.add_argument("--prompt", default="64,512", help="their prompts' rows: uniform in [a, b]")
    ap.add_argument("--decoding", type=int, default=128, help="sessions decoding when the burst comes (beside)")
    ap.add_argument("--row-budget", type=int, default=256, help="rows per tick (coexit serve --rows-per-tick)")
    ap.add_argument("--deadline", type=int, default=300, help="ticks a client waits for its first token")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="", help="what code this is (printed)")
    args = ap.parse_args()
    lo, hi = map(int, args.prompt.split(","))
    print(f"# {args.label or 'this checkout'}: {args.burst} new sessions, prompts of {lo}-{hi} rows, "
          f"row budget {args.row_budget}")
    print(f"| scenario | ticks to first token p10 / p25 / p50 / mean / p90 / max | within {args.deadline} ticks "
          "| all answered after | decoding: tokens a tick / longest wait | host time a tick |")
    print("|---|---|---|---|---|---|")
    near = args.row_budget - args.row_budget // 16
    for name, burst, decoding, every in (("alone", args.burst, 0, 0), ("beside", args.burst, args.decoding, 0),
                                         (f"one every 4 ticks beside {near}", args.burst // 3, near, 4)):
        r = run(burst, (lo, hi), decoding, args.row_budget, args.seed, every)
        dec = f"{decoding} sessions: {r['tokens']:.1f} / {r['gap']} ticks" if decoding else "-"
        within = float((r["answered"] <= args.deadline).mean())
        print(f"| {name} | {' / '.join(f'{x:.0f}' for x in r['pct'])} / {r['mean']:.1f} / {r['p90']:.0f} / "
              f"{r['max']:.0f} | {within:.0%} | {r['ticks']} ticks | {dec} | {r['host'] * 1e6:,.0f} µs |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
