"""Edge share at a stated agreement, max-prob against the learned gate: for each model, calibration positions are
collected on-policy (the full model's own greedy continuations of held-out prompts); the learned gate is fitted
on half of them, and both criteria choose Learn-then-Test thresholds (confidence 1 - delta) on the other half.
Prints a markdown table of the edge share at 99 / 95 / 90% agreement (the model card's).

    python bench/gate_table.py MODEL_DIR [MODEL_DIR ...] [--data data/corpus/heldout.jsonl] [--tokens 20000]
"""

from __future__ import annotations

import argparse
import sys

import torch

import coexit
from edge.policy.calibrate import choose_thresholds, collect_on_policy, read_texts
from edge.policy.gate import ExitGate


def shares(model_dir: str, data: str, tokens: int, targets: list[float], delta: float, seed: int = 0) -> dict:
    model = coexit.load(model_dir, dtype=torch.float32)
    exits = [e for e in model.config.exit_layers if e <= model.config.split_layer]
    stats = collect_on_policy(model, read_texts(data, tokens * 6), exits, "max_prob", max_tokens=tokens,
                              features=True)
    n = next(iter(stats.agree.values())).numel()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, held = perm[: n // 2], perm[n // 2:]
    gates = {e: ExitGate.fit(stats.feats[e][fit], stats.agree[e][fit]) for e in exits}
    held_stats = stats.subset(held)
    learned = stats.subset(held)
    learned.conf = {e: gates[e].score(learned.feats[e]) for e in exits}
    out = {}
    for name, st in (("max-prob", held_stats), ("learned gate", learned)):
        for t in targets:
            _, rep = choose_thresholds(st, exits, t, "max_prob", delta=delta)
            out[(name, t)] = rep["edge_share"]
    out["positions"] = held.numel()
    out["reachable"] = float(torch.stack([stats.agree[e][held] for e in exits]).any(0).float().mean())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", default="data/corpus/heldout.jsonl")
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--delta", type=float, default=0.05)
    args = ap.parse_args(argv)
    targets = [0.99, 0.95, 0.9]
    print("| model | criterion | " + " | ".join(f"edge share at {t:.0%}" for t in targets) + " |")
    print("|---|---|" + "---|" * len(targets))
    for m in args.models:
        r = shares(m, args.data, args.tokens, targets, args.delta)
        for name in ("max-prob", "learned gate"):
            print(f"| {m} | {name} | " + " | ".join(f"{r[(name, t)]:.1%}" for t in targets) + " |", flush=True)
        print(f"<!-- {m}: {r['positions']} on-policy positions; an exit agrees with the final head at "
              f"{r['reachable']:.1%} of them (a perfect gate's share at 100%) -->", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
