"""`coexit calibrate`: per-exit thresholds so that tokens exited on the edge agree with the full model at a target
rate on held-out data, and the share of tokens that then exit on the edge.

Method: run the full model over held-out text (teacher forcing) and record, at every position, each edge exit's
confidence and whether its top-1 equals the final head's top-1. Exits are taken in order, so thresholds are chosen
in order: for each exit, among the positions no earlier exit took, the lowest threshold whose accepted positions
agree with the final head at >= target. Every exit's accepted set meets the target, hence so does their union.
The result is written to DIR/exit_policy.json, which EdgeClient.from_checkpoint uses as its default policy.
The file also holds the frontier of threshold vectors the adaptive policy (edge/adaptive.py) chooses from, and its
default quality budget: the fixed policy's own disagreement over all calibration positions.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import coexit
from coexit.exits import ExitPolicy, confidence
from coexit.textdata import read_documents
from edge.adaptive import AdaptivePolicy, FrontierPoint, evaluate, frontier

POLICY_FILE = "exit_policy.json"


@dataclass
class ExitStats:
    conf: dict[int, torch.Tensor]  # exit layer -> (N,) confidence
    agree: dict[int, torch.Tensor]  # exit layer -> (N,) bool: exit top-1 == final top-1


def read_texts(path: str | Path, limit_chars: int) -> list[str]:
    """Documents from a .jsonl corpus (field "text"), a text file or a directory, up to about limit_chars."""
    texts, total = [], 0
    for doc in read_documents([path]):
        texts.append(doc)
        total += len(doc)
        if total >= limit_chars:
            break
    return texts


@torch.no_grad()
def collect(model: coexit.EarlyExitLM, texts: list[str], exits: list[int], criterion: str, seq_len: int = 256,
            max_tokens: int = 50_000) -> ExitStats:
    tok = model.tokenizer
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t, add_bos=True)
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    conf = {e: [] for e in exits}
    agree = {e: [] for e in exits}
    for a in tqdm(range(0, len(ids) - 1, seq_len), desc="calibrating", unit="window"):
        x = torch.tensor([ids[a:a + seq_len]])
        out = model(x, exits=exits)
        final = out.logits[0].argmax(-1)
        for e in exits:
            lg = out.exit_logits[e][0]
            agree[e].append(lg.argmax(-1) == final)
            conf[e].append(torch.tensor([confidence(row, criterion) for row in lg]))
    return ExitStats({e: torch.cat(v) for e, v in conf.items()}, {e: torch.cat(v) for e, v in agree.items()})


def choose_thresholds(stats: ExitStats, exits: list[int], target: float, criterion: str,
                      min_support: int = 20) -> tuple[dict[int, float], dict]:
    n = next(iter(stats.conf.values())).numel()
    remaining = torch.ones(n, dtype=torch.bool)
    thresholds: dict[int, float] = {}
    report = {"positions": n, "per_exit": {}}
    sign = -1.0 if criterion == "entropy" else 1.0  # make "higher is more confident"
    for e in exits:
        c, ok = sign * stats.conf[e][remaining], stats.agree[e][remaining]
        order = torch.argsort(c, descending=True)
        hits = ok[order].float().cumsum(0)
        counts = torch.arange(1, order.numel() + 1)
        precision = hits / counts
        valid = (precision >= target) & (counts >= min_support)
        if not bool(valid.any()):
            report["per_exit"][e] = {"threshold": None, "share": 0.0}
            continue
        k = int(valid.nonzero().max())  # the largest accepted set that still meets the target
        t = float(c[order[k]])
        thresholds[e] = sign * t
        taken_local = c >= t
        idx = remaining.nonzero().flatten()[taken_local]
        report["per_exit"][e] = {"threshold": sign * t, "share": idx.numel() / n,
                                 "agreement": float(ok[taken_local].float().mean())}
        remaining[idx] = False
    taken = ~remaining
    agree_all = torch.zeros(n, dtype=torch.bool)
    still = torch.ones(n, dtype=torch.bool)
    for e in exits:
        if e in thresholds:
            acc = still & ((stats.conf[e] >= thresholds[e]) if sign > 0 else (stats.conf[e] <= thresholds[e]))
            agree_all |= acc & stats.agree[e]
            still &= ~acc
    report["edge_share"] = float(taken.float().mean())
    report["edge_agreement"] = float(agree_all[taken].float().mean()) if bool(taken.any()) else None
    return thresholds, report


def calibrate(model_dir: str | Path, data: str | Path, target: float = 0.99, criterion: str = "max_prob",
              max_tokens: int = 50_000, write: bool = True) -> dict:
    model = coexit.load(model_dir, dtype=torch.float32)
    exits = [e for e in model.config.exit_layers if e <= model.config.split_layer]
    stats = collect(model, read_texts(data, max_tokens * 6), exits, criterion, max_tokens=max_tokens)
    thresholds, report = choose_thresholds(stats, exits, target, criterion)
    high = criterion != "entropy"
    fixed = evaluate(stats.conf, stats.agree, exits, thresholds, high)
    result = {"criterion": criterion, "target": target, "thresholds": {str(k): v for k, v in thresholds.items()},
              **report, "disagreement": fixed.disagreement,
              "frontier": [p.to_dict() for p in frontier(stats.conf, stats.agree, exits, high, include=thresholds)]}
    if write:
        (Path(model_dir) / POLICY_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def load_policy(model_dir: str | Path, adaptive: bool = False,
                quality_budget: float | None = None) -> ExitPolicy | None:
    """The calibrated policy of DIR/exit_policy.json, or with adaptive=True the network-aware one over its
    frontier, within quality_budget (default: the fixed policy's own disagreement on the calibration data)."""
    f = Path(model_dir) / POLICY_FILE
    if not f.is_file():
        if adaptive:
            raise FileNotFoundError(f"the adaptive policy needs {f}: run `coexit calibrate --model {model_dir}`")
        return None
    d = json.loads(f.read_text())
    criterion = d.get("criterion", "max_prob")
    if not adaptive:
        return ExitPolicy({int(k): float(v) for k, v in d["thresholds"].items()}, criterion)
    if "frontier" not in d:
        raise ValueError(f"{f} has no frontier for the adaptive policy: re-run `coexit calibrate`")
    budget = d["disagreement"] if quality_budget is None else quality_budget
    split = coexit.read_config(model_dir).split_layer
    return AdaptivePolicy({}, criterion, points=[FrontierPoint.from_dict(p) for p in d["frontier"]],
                          budget=budget, split=split)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="coexit calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="held-out .jsonl (field text), text file or directory")
    ap.add_argument("--target", type=float, default=0.99, help="agreement of edge-exited tokens with the full model")
    ap.add_argument("--criterion", choices=["max_prob", "margin", "entropy"], default="max_prob")
    ap.add_argument("--max-tokens", type=int, default=50_000)
    ap.add_argument("--dry-run", action="store_true", help="print, do not write exit_policy.json")
    args = ap.parse_args(argv)
    r = calibrate(args.model, args.data, args.target, args.criterion, args.max_tokens, write=not args.dry_run)
    for e, v in r["per_exit"].items():
        thr = "never" if v["threshold"] is None else f"{v['threshold']:.4f}"
        print(f"exit {e}: threshold {thr}, takes {v['share']:.1%} of tokens")
    agreement = "n/a" if r["edge_agreement"] is None else f"{r['edge_agreement']:.2%}"
    print(f"edge share {r['edge_share']:.1%} at agreement {agreement} (target {args.target:.0%}) over "
          f"{r['positions']} held-out positions" + ("" if args.dry_run else f"; wrote {args.model}/{POLICY_FILE}"))
    return 0
