"""`coexit generate --model DIR --cloud HOST:PORT "prompt"`: print the text with each token's origin, then a
summary line (edge share, fallbacks, bytes, latency)."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from coexit.checkpoint import read_config
from coexit.errors import UsageError
from coexit.exits import CRITERIA, ExitPolicy, check_thresholds
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
    cloud = len(gen.events) - edge
    lat = [e.latency_s * 1e3 for e in gen.events] or [0.0]
    drafts = (f"; drafts {c.drafts}: {c.accepted} accepted, {c.rejected} rejected, {c.wasted} void"
              if c.drafts else "")
    return (f"{len(gen.events)} tokens: {edge / n:.0%} on the edge, {cloud} from the cloud ({c.fallbacks} "
            f"waited-for fallbacks), {c.standalone} standalone{drafts}; up {c.bytes_up / n:.0f} B/token, down "
            f"{c.bytes_down / n:.0f} B/token; latency p50 {statistics.median(lat):.1f} ms, max {max(lat):.1f} ms")


def parse_thresholds(text: str | None) -> dict[int, float]:
    """"2=0.8,4=0.9" -> {2: 0.8, 4: 0.9}."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        layer, eq, value = item.partition("=")
        try:
            if not eq:
                raise ValueError
            out[int(layer)] = float(value)
        except ValueError:
            raise UsageError(f"--thresholds takes LAYER=VALUE pairs separated by commas, like 2=0.8,4=0.9; got "
                             f"{item!r}") from None
    return out


def choose_policy(args) -> ExitPolicy:
    """--policy, or by default the model's calibrated policy unless fixed thresholds were given. Flags the chosen
    policy would ignore are refused."""
    from edge.policy.calibrate import load_policy

    fixed = args.threshold is not None or bool(args.thresholds)
    kind = args.policy or ("fixed" if fixed else "calibrated")
    if kind != "fixed" and fixed:
        raise UsageError(f"--threshold/--thresholds set a fixed policy, but --policy is {kind}: drop one of them")
    if kind != "fixed" and args.criterion is not None:
        raise UsageError(f"--criterion applies to fixed thresholds; the {kind} policy uses the criterion it was "
                         f"calibrated with: pass --threshold(s) with it, or drop it")
    if kind != "adaptive" and args.quality_budget is not None:
        raise UsageError("--quality-budget applies to --policy adaptive only")
    if args.quality_budget is not None and not 0 <= args.quality_budget <= 1:
        raise UsageError(f"--quality-budget is a share of tokens in [0, 1], got {args.quality_budget}")
    from edge.policy.calibrate import POLICY_FILE

    where = args.adapter if args.adapter and (Path(args.adapter) / POLICY_FILE).is_file() else args.model
    if kind == "adaptive":  # an adapter calibrated with `coexit calibrate --adapter` brings its own policy
        return load_policy(where, adaptive=True, quality_budget=args.quality_budget, config_dir=args.model)
    if kind == "calibrated" and (policy := load_policy(where, config_dir=args.model)) is not None:
        return policy
    threshold = 0.9 if args.threshold is None else args.threshold
    criterion = args.criterion or "max_prob"
    exits = read_config(args.model).edge_exit_layers
    thresholds = parse_thresholds(args.thresholds) or {e: threshold for e in exits}
    check_thresholds(thresholds, exits, criterion)
    return ExitPolicy(thresholds, criterion)


def check_args(args) -> None:
    """Refuse out-of-range numbers and flags the chosen mode or backend would ignore, before loading anything."""
    if args.mode not in ("standalone",) and not args.cloud:
        raise UsageError(f"--mode {args.mode} needs the cloud: pass --cloud HOST:PORT of a `coexit serve`, or use "
                         f"--mode standalone")
    if args.mode == "standalone" and args.cloud:
        raise UsageError("--mode standalone never uses the cloud: drop --cloud, or pick another --mode")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.deadline <= 0:
        raise UsageError(f"--deadline must be positive seconds, got {args.deadline}")
    bnb_policy = args.backend.startswith("bnb-") and str(args.quant).endswith(".json")
    if args.backend != "gguf" and ((args.quant is not None and not bnb_policy) or args.layout is not None):
        raise UsageError("--quant and --layout apply to --backend gguf only (bnb backends take --quant "
                         "POLICY.json, a policy from `coexit compress --backend bnb`)")
    if args.mode != "lossless" and (args.max_drafts is not None or args.draft_when_confident):
        raise UsageError("--max-drafts and --draft-when-confident apply to --mode lossless only")
    if args.max_drafts is not None and args.max_drafts < 1:
        raise UsageError(f"--max-drafts must be at least 1, got {args.max_drafts}")
    if args.kv_fill != "exact" and args.mode != "collaborative":
        raise UsageError(f"--kv-fill {args.kv_fill} applies to --mode collaborative only ({args.mode} always fills "
                         f"the cloud's KV exactly)")
    if args.mode in ("standalone",) and (args.token or args.tls_ca):
        raise UsageError("--token and --tls-ca are for the cloud, which --mode standalone never uses")
    if args.tls_ca and not Path(args.tls_ca).is_file():
        raise UsageError(f"--tls-ca {args.tls_ca}: no such file (the PEM of the CA that signed the cloud's "
                         f"certificate)")
    SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)  # raises UsageError when out of range


def parser() -> argparse.ArgumentParser:
    from coexit.cli import HelpFormatter

    ap = argparse.ArgumentParser(prog="coexit generate", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("prompt", help="the text to continue")
    ap.add_argument("--model", required=True, help="checkpoint directory (config.json, model.safetensors, "
                                                   "tokenizer.json, exit_policy.json)")
    ap.add_argument("--cloud", help="HOST:PORT of `coexit serve` (every mode but standalone needs it)")
    ap.add_argument("--mode", choices=MODES, default="collaborative", help="who makes each token (README: modes)")
    ap.add_argument("--backend", choices=KINDS, default="torch",
                    help="edge runtime (gguf exports the edge layers into the model directory on first use)")
    ap.add_argument("--quant", help="GGUF quantization for --backend gguf (default q8_0), or a compression policy "
                                    "file from `coexit compress` (e.g. MODEL/quant_policy.json; for bnb-* backends, "
                                    "one from `coexit compress --backend bnb`)")
    ap.add_argument("--adapter", help="a LoRA adapter directory (`coexit adapt`, or PEFT's layout) applied to the "
                                      "edge layers, on every backend (llama.cpp applies it at run time)")
    ap.add_argument("--layout", choices=["segments", "whole"],
                    help="--backend gguf: one file per exit interval (exits skip the layers above) or one file "
                         "(default: segments when the policy can stop or looks below the split, else whole)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate at most")
    ap.add_argument("--threshold", type=float,
                    help="a fixed exit threshold for every edge exit (default policy: the model's calibrated "
                         "exit_policy.json, else 0.9 at every edge exit)")
    ap.add_argument("--thresholds", help="per-exit thresholds, e.g. 2=0.8,4=0.9 (overrides --threshold)")
    ap.add_argument("--criterion", choices=CRITERIA,
                    help="criterion of --threshold(s) (default max_prob; calibrated policies bring their own)")
    ap.add_argument("--policy", choices=["calibrated", "fixed", "adaptive"],
                    help="calibrated: the model's exit_policy.json (the default unless --threshold(s) is given); "
                         "fixed: --threshold(s); adaptive: the network-aware policy over its calibrated frontier")
    ap.add_argument("--quality-budget", type=float,
                    help="adaptive policy: disagreement allowed over all tokens (default: the calibrated policy's)")
    ap.add_argument("--encoding", choices=["fp32", "fp16", "bf16", "int8"], default="fp16",
                    help="how hidden rows travel to the cloud")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--deadline", type=float, default=5.0, help="seconds to wait for the cloud per step")
    ap.add_argument("--token", help="bearer token the cloud requires")
    ap.add_argument("--tls-ca", help="PEM CA certificate: connect with TLS and trust servers it signed")
    ap.add_argument("--kv-fill", choices=["exact", "propagate"], default="exact",
                    help="collaborative mode: how the cloud fills the KV of edge-exited positions")
    ap.add_argument("--max-drafts", type=int, help="lossless mode: drafts in flight at most (default 8)")
    ap.add_argument("--draft-when-confident", action="store_true",
                    help="lossless mode: draft only from a confident exit (default: else from the split exit)")
    ap.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                    help="colour tokens by origin (auto: on a terminal)")
    return ap


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    check_args(args)
    read_config(args.model)  # a wrong --model: one line naming the directory, before anything else loads
    policy = choose_policy(args)
    backend_kw = {"quant": args.quant or "q8_0", "layout": args.layout} if args.backend == "gguf" else {}
    if args.backend.startswith("bnb-") and args.quant:
        backend_kw["policy"] = args.quant
    if args.adapter:
        backend_kw["adapter"] = args.adapter
    client = EdgeClient.from_checkpoint(args.model, cloud=args.cloud, backend=args.backend, mode=args.mode,
                                        encoding=args.encoding, deadline_s=args.deadline, token=args.token,
                                        tls_ca=args.tls_ca, backend_kw=backend_kw, kv_fill=args.kv_fill,
                                        max_drafts=args.max_drafts or 8,
                                        draft_always=not args.draft_when_confident, policy=policy)
    try:
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
        gen = client.generate(args.prompt, args.max_new_tokens, sampling)
    finally:
        client.close()
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(args.prompt + render(gen, colour))
    legend = "green = edge exit, blue = cloud, yellow = edge while the cloud was unreachable" if colour else \
        "[E<layer>] = edge exit at that layer, [C] = cloud, [S] = edge while the cloud was unreachable"
    if args.mode == "lossless":
        legend += " (lossless: every token verified by the full model; edge = an accepted draft)"
    print(f"-- {legend}")
    print(summary(gen))
    return 0
