"""Benchmark: the engine process's work to take in the front ends' Appends (`coexit serve --frontends N`).

With front ends, each turn of a front end's event loop sends its plain-token Appends to the engine process as one
message (cloud/ipc.py: APPENDS, the entries pickled, their rows back to back), and the engine process queues every
entry of it in one pass (`AppendBatch.submit`). That runs on the engine process's event loop, beside the engine
thread and under the same GIL: at hundreds of sessions a tick, on a GPU whose step takes a millisecond or two, it
is the engine process's largest host cost per Append.

This drives bench/engine_overhead.py's harness (the real scheduler, engine and replies, no model compute): N
sessions decode, each sends its next row once answered, and each tick's rows reach the engine as one message per
front end (4), built as RemoteBackend builds them (untimed). Printed per N: the time `AppendBatch.submit` takes
per tick (p50 / p99, all front ends' messages) and per Append, beside the tick's host critical path.

    python bench/engine_ingest.py [--ticks 2000] [--sessions 64,256,1024]
    (cd /path/to/other/checkout && python bench/engine_ingest.py)     # another version's code, with its own bench
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_overhead as eo  # noqa: E402

FRONTS = 4


class IngestHarness(eo.Harness):
    """engine_overhead's harness, its decode rows queued through the engine process's AppendBatch."""

    def __init__(self, sessions: int, seed: int) -> None:
        super().__init__(sessions, seed)
        from cloud.backend import LocalBackend
        from cloud.ipc import AppendBatch

        self.batch = AppendBatch(LocalBackend.over(self.manager), self.packed)  # the engine process's, around
        # the harness's engine
        self.ingest: list[tuple[float, int]] = []  # (seconds, Appends) per tick

    def submit_decode(self) -> None:
        from cloud.ipc import _ALIGN, _tensor_bytes
        from coexit.sampling import GREEDY

        entries: list[list] = [[] for _ in range(FRONTS)]
        data: list[list] = [[] for _ in range(FRONTS)]
        for i, entry in enumerate(self.sessions):
            s = entry[0]
            if not s.queue:
                self._answered(entry)
                self.rid += 1
                meta, raw = _tensor_bytes(self.rows[self.rid % 4096][None].half())  # as the edge sends them
                entries[i % FRONTS].append((self.rid, s.id, s.expected, meta, GREEDY, (len(raw) + 40, 0), None,
                                            len(raw)))
                data[i % FRONTS] += (raw, bytes(-len(raw) % _ALIGN))
        msgs = [(b"front-%d" % f, pickle.dumps(entries[f]), b"".join(data[f])) for f in range(FRONTS) if entries[f]]
        t0 = time.perf_counter()
        for front, e, d in msgs:
            refused = self.batch.submit(front, e, d)
            assert not refused, refused
        self.ingest.append((time.perf_counter() - t0, sum(len(e) for e in entries)))


def run(n: int, ticks: int, warmup: int, seed: int) -> dict:
    h = IngestHarness(n, seed)
    try:
        h.open_decoding(n)
        crit = []
        for i in range(warmup + ticks):
            if i % 256 == 255:
                h.reset_contexts()
            h.submit_decode()
            ph = h.tick()
            h.fan.drain()
            if i >= warmup:
                crit.append(sum(ph[p] for p in eo.PHASES))
        ing = h.ingest[warmup:]
        secs = [s for s, _ in ing]
        per = [s / k for s, k in ing if k]
        return dict(ingest=(eo.pct(secs, .5), eo.pct(secs, .99)), per=(eo.pct(per, .5), eo.pct(per, .99)),
                    appends=float(np.mean([k for _, k in ing])), critical=(eo.pct(crit, .5), eo.pct(crit, .99)))
    finally:
        h.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ticks", type=int, default=2000, help="timed ticks per row, after the warm-up")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--sessions", default="64,256,1024")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import cloud

    print(f"# engine_ingest: code at {Path(cloud.__file__).resolve().parent.parent}; {args.ticks} timed ticks per "
          f"row after {args.warmup}; {FRONTS} front ends' messages a tick; µs (p50 / p99)")
    print("| sessions | Appends per tick | ingest per tick | ingest per Append | host critical path per tick |")
    print("|---|---|---|---|---|")
    for n in (int(s) for s in args.sessions.split(",")):
        r = run(n, args.ticks, args.warmup, args.seed)
        print(f"| {n} | {r['appends']:.0f} | {eo.us(r['ingest'][0])} / {eo.us(r['ingest'][1])} | "
              f"{r['per'][0] * 1e6:.1f} / {r['per'][1] * 1e6:.1f} | {eo.us(r['critical'][0])} / "
              f"{eo.us(r['critical'][1])} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
