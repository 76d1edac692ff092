"""Benchmark: collaborative vs cloud-only vs naive-split on a tiny model over loopback.

Starts `coexit serve` as a separate process (a real loopback link), then generates with each mode and prints a
table: per-token latency (p50/p99), bytes up/down per generated token, cloud layer-tokens per generated token
relative to cloud-only, and the round-trip overhead of one fallback beyond the cloud's compute (goal <= 2 ms).

    python bench/split_decoding.py [--model DIR] [--tokens 64] [--prompts 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import coexit  # noqa: E402  (after the path: `python bench/split_decoding.py` runs it as a script)
from bench import shown  # noqa: E402
from cloud.launch import start_cloud  # noqa: E402
from coexit.decoding import generate_full  # noqa: E402
from coexit.exits import ExitPolicy, confidence  # noqa: E402
from coexit.tiny import make_checkpoint  # noqa: E402
from edge.backends import TorchBackend  # noqa: E402
from edge.client import EdgeClient  # noqa: E402

PROMPTS = ["def add(a, b):\n    return", "import os\nimport sys\n", "class Point:\n    def __init__(self, x, y):",
           "for i in range(10):\n    print("]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def median_policy(model, ids) -> ExitPolicy:
    """Per-exit thresholds at the median confidence on the full model's greedy path (about half exit)."""
    seq = ids + generate_full(model, ids, 32)
    with torch.no_grad():
        out = model(torch.tensor([seq]), exits="all")
    edge = [e for e in model.config.exit_layers if e <= model.config.split_layer]
    return ExitPolicy({e: statistics.median(confidence(r, "max_prob") for r in out.exit_logits[e][0]) for e in edge})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: a tiny random one)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--encoding", default="fp16")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model or make_checkpoint(Path(tmp.name) / "tiny", "tiny")
    full = coexit.load(model_dir)
    proc, address = start_cloud(model_dir)
    try:
        client = EdgeClient(TorchBackend.from_checkpoint(model_dir), full.tokenizer, cloud=address,
                            encoding=args.encoding)
        prompts = [full.tokenizer.encode(p, add_bos=True) for p in PROMPTS[: args.prompts]]
        policy = median_policy(full, prompts[0])
        rows = []
        for mode in ("cloud-only", "naive-split", "collaborative"):
            client.generate(prompts[0], 4, policy=policy, mode=mode, stop_at_eos=False)  # warm up
            lat, up, down, cloud_lt, rtt, comp, edge_share, n = [], 0, 0, 0, [], [], 0, 0
            t0 = time.perf_counter()
            for ids in prompts:
                g = client.generate(ids, args.tokens, policy=policy, mode=mode, stop_at_eos=False)
                lat += [e.latency_s for e in g.events[1:]]  # per-token decode latency (first token = prefill)
                up, down = up + g.counters.bytes_up, down + g.counters.bytes_down
                cloud_lt += g.counters.cloud_layer_tokens
                rtt += g.counters.rtts_s[1:]
                comp += g.counters.cloud_compute_s[1:]
                edge_share += sum(e.origin != "cloud" for e in g.events)
                n += len(g.events)
            wall = time.perf_counter() - t0
            over = [r - c for r, c in zip(rtt, comp)]
            rows.append((mode, n, edge_share / n, 1e3 * pct(lat, 0.5), 1e3 * pct(lat, 0.99), up / n, down / n,
                         cloud_lt, 1e3 * pct(over, 0.5) if over else float("nan"), n / wall))
        base = rows[0][7]
        name = shown(model_dir, "a tiny random checkpoint" if not args.model else None)
        print(f"\nmodel {name}: {full.config.num_hidden_layers} layers, split {full.config.split_layer}, "
              f"hidden {full.config.hidden_size}; {len(prompts)} prompts x {args.tokens} tokens; encoding "
              f"{args.encoding}; loopback; thresholds { {k: round(v, 3) for k, v in policy.thresholds.items()} }")
        head = ("mode", "tokens", "edge share", "p50 ms/tok", "p99 ms/tok", "up B/tok", "down B/tok",
                "cloud compute vs cloud-only", "fallback overhead p50 ms", "tok/s")
        print(" | ".join(head))
        for r in rows:
            print(f"{r[0]} | {r[1]} | {r[2]:.0%} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.0f} | {r[6]:.0f} | "
                  f"{r[7] / base:.2f}x | {r[8]:.2f} | {r[9]:.0f}")
        print("fallback overhead = edge-measured round trip minus the cloud's reported compute (goal <= 2 ms)")
        client.close()
    finally:
        proc.kill()
        proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
