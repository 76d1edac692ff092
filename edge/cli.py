"""`coexit generate --model DIR --cloud HOST:PORT "prompt"`: print the text with each token's origin, then a
summary line (edge share, fallbacks, bytes, latency)."""

from __future__ import annotations

import argparse
import statistics
import sys

from coexit.checkpoint import read_config
from coexit.exits import CRITERIA, ExitPolicy
from coexit.sampling import SamplingParams
from edge.backends import KINDS
from edge.client import MODES, EdgeClient, Generation

COLOURS = {"edge": "\033[32m", "cloud": "\033[34m", "edge-standalone": "\033[33m"}
RESET = "\033[0m"


def render(gen: Generation, colour: bool) -> str:
    out = []
    for e in gen.events:
        if colour:
            out.append(f"{COLOURS[e.origin]}{e.text}{RESET}")
        else:
            tag = "C" if e.origin == "cloud" else ("S" if e.origin == "edge-standalone" else f"E{e.exit_layer}")
            out.append(f"{e.text}[{tag}]")
    return "".join(out)


def summary(gen: Generation) -> str:
    c, n = gen.counters, max(1, len(gen.events))
    edge = sum(e.origin != "cloud" for e in gen.events)
    lat = [e.latency_s * 1e3 for e in gen.events] or [0.0]
    drafts = (f"; drafts {c.drafts}: {c.accepted} accepted, {c.rejected} rejected, {c.wasted} void"
              if c.drafts else "")
    return (f"{len(gen.events)} tokens: {edge / n:.0%} on the edge, {c.fallbacks} cloud fallbacks, "
            f"{c.standalone} standalone{drafts}; up {c.bytes_up / n:.0f} B/token, down {c.bytes_down / n:.0f} "
            f"B/token; latency p50 {statistics.median(lat):.1f} ms, max {max(lat):.1f} ms")


def parse_thresholds(text: str | None) -> dict[int, float]:
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        layer, _, value = item.partition("=")
        out[int(layer)] = float(value)
    return out


def choose_policy(args) -> ExitPolicy:
    """--policy, or by default the model's calibrated policy unless fixed thresholds were given."""
    from edge.calibrate import load_policy

    kind = args.policy or ("fixed" if args.threshold is not None or args.thresholds else "calibrated")
    if kind == "adaptive":
        return load_policy(args.model, adaptive=True, quality_budget=args.quality_budget)
    if kind == "calibrated" and (policy := load_policy(args.model)) is not None:
        return policy
    threshold = 0.9 if args.threshold is None else args.threshold
    return ExitPolicy(parse_thresholds(args.thresholds) or
                      {e: threshold for e in read_config(args.model).edge_exit_layers}, args.criterion)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="coexit generate", description=__doc__)
    ap.add_argument("prompt")
    ap.add_argument("--model", required=True)
    ap.add_argument("--cloud", help="HOST:PORT of `coexit serve` (not needed for --mode standalone)")
    ap.add_argument("--mode", choices=MODES, default="collaborative")
    ap.add_argument("--backend", choices=KINDS, default="torch", help="edge runtime (gguf exports on first use)")
    ap.add_argument("--quant", default="q8_0", help="GGUF quantization for --backend gguf")
    ap.add_argument("--layout", choices=["segments", "whole"],
                    help="--backend gguf: one file per exit interval (exits skip the layers above) or one file "
                         "(default: segments when the policy can stop or looks below the split, else whole)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threshold", type=float,
                    help="a fixed exit threshold for every edge exit (default policy: the model's calibrated "
                         "exit_policy.json, else 0.9 at every edge exit)")
    ap.add_argument("--thresholds", help="per-exit thresholds, e.g. 2=0.8,4=0.9 (overrides --threshold)")
    ap.add_argument("--criterion", choices=CRITERIA, default="max_prob")
    ap.add_argument("--policy", choices=["calibrated", "fixed", "adaptive"],
                    help="calibrated: the model's exit_policy.json (the default unless --threshold(s) is given); "
                         "fixed: --threshold(s); adaptive: the network-aware policy over its calibrated frontier")
    ap.add_argument("--quality-budget", type=float, help="adaptive policy: disagreement allowed over all tokens")
    ap.add_argument("--encoding", choices=["fp32", "fp16", "bf16", "int8"], default="fp16")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=5.0, help="seconds to wait for the cloud per step")
    ap.add_argument("--token", help="bearer token the cloud requires")
    ap.add_argument("--tls-ca", help="PEM CA certificate: connect with TLS and trust servers it signed")
    ap.add_argument("--kv-fill", choices=["exact", "propagate"], default="exact",
                    help="collaborative mode: how the cloud fills the KV of edge-exited positions")
    ap.add_argument("--max-drafts", type=int, default=8, help="lossless mode: drafts in flight at most")
    ap.add_argument("--draft-when-confident", action="store_true",
                    help="lossless mode: draft only from a confident exit (default: else from the split exit)")
    ap.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    return ap


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    policy = choose_policy(args)
    backend_kw = {"quant": args.quant, "layout": args.layout} if args.backend == "gguf" else {}
    client = EdgeClient.from_checkpoint(args.model, cloud=args.cloud, backend=args.backend, mode=args.mode,
                                        encoding=args.encoding, deadline_s=args.deadline, token=args.token,
                                        tls_ca=args.tls_ca, backend_kw=backend_kw, kv_fill=args.kv_fill,
                                        max_drafts=args.max_drafts, draft_always=not args.draft_when_confident,
                                        policy=policy)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    gen = client.generate(args.prompt, args.max_new_tokens, sampling)
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(args.prompt + render(gen, colour))
    legend = "green = edge exit, blue = cloud, yellow = edge while the cloud was unreachable" if colour else \
        "[E<layer>] = edge exit at that layer, [C] = cloud, [S] = edge while the cloud was unreachable"
    if args.mode == "lossless":
        legend += " (lossless: every token verified by the full model; edge = an accepted draft)"
    print(f"-- {legend}")
    print(summary(gen))
    client.close()
    return 0
