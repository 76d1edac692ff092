"""Benchmark: what `coexit adapt` buys a user, end to end, on a package held out of the training corpus.

Adapts the bundled model's edge layers on 80% of a package's files (default: aiohttp, installed with the project
and not in the corpus) and evaluates on the other 20%, teacher-forced, before and after:
- each edge exit's top-1 accuracy on the real next token;
- the cloud's accuracy (the unadapted deep layers on that edge's split rows), over all positions and over the
  policy's fallback positions;
- the collaborative system's accuracy on the real next token and its edge share, each model under thresholds
  calibrated (max-prob, target 99%) on the user's own training files, twice: judged against the model's own final
  head (agreement, `coexit calibrate`'s default) and against the real next token (`--reference text`: an exit is
  acceptable unless the cloud had the token and the exit did not; rows marked "reference text");
- cloud-only accuracy (the unadapted model), the bar the issue sets;
- exit voting at the split against the split exit alone, at the same edge share (the calibrated policy's).

And (`--phase memory`) peak RSS and seconds per step of four ways to tune the same edge layers on the same
batches, each in a fresh process: full fine-tuning (AdamW on every edge weight, loss at the split exit), LoRA over
the full edge depth (loss at the split exit), and windowed LoRA (`coexit adapt`: one window at a time, no autograd
below it, loss at its exit), on the bundled model and on a TinyLlama-shaped edge (11 layers, d 2048, random).

    python bench/adapt.py [--package DIR] [--steps 300] [--tokens 16384]
    python bench/adapt.py --phase memory [--batch 4 --seq-len 256]
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import coexit  # noqa: E402
from coexit.lora import merge_adapter  # noqa: E402
from coexit.textdata import spread_chunks  # noqa: E402
from edge.apps.adapt import SCHEDULES, adapt  # noqa: E402
from edge.policy.calibrate import REFERENCES, choose_thresholds, collect  # noqa: E402
from edge.policy.voting import RULES, combine  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "models" / "coexit-code-small"
POLICY_ROWS = ("cloud top-1 (fallbacks)", "collaborative top-1", "edge share")  # the rows that depend on the policy


@torch.no_grad()
def evaluate(model, chunks, exits, thresholds) -> dict:
    L = model.config.num_hidden_layers
    probs = {e: [] for e in exits}
    cloud, real = [], []
    for c in chunks:
        x = torch.tensor([c])
        out = model(x[:, :-1], exits=list(exits))
        for e in exits:
            probs[e].append(torch.softmax(out.exit_logits[e][0].float(), -1))
        cloud.append(out.logits[0].argmax(-1))
        real.append(x[0, 1:])
    probs = {e: torch.cat(v) for e, v in probs.items()}
    cloud, real = torch.cat(cloud), torch.cat(real)
    n = real.numel()
    token, taken = cloud.clone(), torch.zeros(n, dtype=torch.bool)
    for e in exits:  # the calibrated policy: the first exit whose top-1 probability reaches its threshold
        if e not in thresholds:
            continue
        conf, top = probs[e].max(-1)
        take = ~taken & (conf >= thresholds[e])
        token[take], taken = top[take], taken | take
    r = {f"exit {e} top-1": float((probs[e].argmax(-1) == real).float().mean()) for e in exits}
    r.update({"cloud top-1 (all)": float((cloud == real).float().mean()),
              "cloud top-1 (fallbacks)": float((cloud[~taken] == real[~taken]).float().mean()),
              "collaborative top-1": float((token == real).float().mean()),
              "edge share": float(taken.float().mean()), "positions": n, "L": L})
    split = max(exits)
    share = float(taken.float().mean())
    for name, p in [("split exit alone", probs[split]), *((f"vote: {rule}", combine([probs[e] for e in exits],
                                                                                    rule)) for rule in RULES)]:
        conf, top = p.max(-1)
        k = max(1, int(round(share * n)))
        take = torch.zeros(n, dtype=torch.bool)
        take[conf.topk(k).indices] = True  # the same edge share as the calibrated policy
        mixed = torch.where(take, top, cloud)
        r[f"{name} @ same share: top-1"] = float((mixed == real).float().mean())
        r[f"{name} @ same share: = cloud"] = float((top[take] == cloud[take]).float().mean())
    return r


METHODS = {  # name: (windowed, LoRA, base dtype, activation checkpointing)
    "full fine-tuning": (False, False, torch.float32, False),
    "full-depth LoRA": (False, True, torch.float32, False),
    "full-depth LoRA, bf16 base + checkpointing": (False, True, torch.bfloat16, True),
    "windowed LoRA (coexit adapt)": (True, True, torch.float32, True),
    "windowed LoRA, --base-dtype bf16": (True, True, torch.bfloat16, True),
}


def _tune_once(method: str, model_dir: str, batch: int, seq_len: int, steps: int, queue, r: int = 8,
               alpha: float = 16.0) -> None:
    """In a fresh process: `steps` optimizer steps of one method (edge.apps.adapt.window_loss, the step coexit adapt
    takes; LoRA methods at rank r); reports (peak RSS MiB, seconds per step)."""
    from coexit.lora import TARGETS, LoraConfig, add_lora
    from edge.apps.adapt import window_loss, windows

    windowed, lora, dtype, ckpt = METHODS[method]
    torch.set_num_threads(2)
    cfg = coexit.read_config(model_dir)
    split, exits = cfg.split_layer, cfg.edge_exit_layers
    model = coexit.load(model_dir, layers=(0, split), dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(3, cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak: measure tuning, not the load's transient
    plan = windows(exits) if windowed else [(0, split)]
    times = []
    for lo, hi in plan:
        if not lora:
            params = [p for n, p in model.named_parameters() if "layers." in n]
            for p in params:
                p.requires_grad_(True)
        else:
            mods = add_lora(model, LoraConfig(r, alpha, TARGETS, tuple(range(lo, hi))))
            params = [p for m in mods for p in (m.lora_A, m.lora_B)]
        opt = torch.optim.AdamW(params, lr=1e-4)
        for step in range(steps + 1):  # the first step of each window warms up and is not timed
            t0 = time.perf_counter()
            loss = window_loss(model, lo, hi, ids, 0.0, ckpt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step:
                times.append(time.perf_counter() - t0)
    queue.put((_peak_rss_mib(), sum(times) / max(1, len(times))))


def _peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM: unlike ru_maxrss it is not inherited through fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_phase(args) -> int:
    import multiprocessing as mp

    from bench.cloud_load import write_shape

    ctx = mp.get_context("spawn")
    defaults = inspect.signature(adapt).parameters  # coexit adapt's own rank and alpha unless given
    r = args.rank or defaults["r"].default
    alpha = args.alpha or (defaults["alpha"].default if args.rank is None else 2.0 * r)
    with tempfile.TemporaryDirectory() as tmp:
        shapes = {"bundled model (d 384, edge 4 layers)": str(MODEL)}
        edge11 = write_shape("tinyllama", Path(tmp) / "tinyllama")
        shapes["TinyLlama-shaped edge (d 2048, 11 layers, random)"] = str(edge11)
        print(f"batch {args.batch} x {args.seq_len} tokens, {args.steps_memory} steps per window, AdamW (fp32 "
              f"adapters, LoRA r {r} alpha {alpha:g}), 2 threads; peak RSS of a fresh process while it tunes "
              f"(the edge weights included, the load's transient not)\n")
        print("| model | method | peak RSS | s/step | RSS vs full FT | speed vs full-depth LoRA |")
        print("|---|---|---|---|---|---|")
        for name, path in shapes.items():
            res = {}
            for method in METHODS:
                q = ctx.Queue()
                p = ctx.Process(target=_tune_once, args=(method, path, args.batch, args.seq_len, args.steps_memory,
                                                         q, r, alpha))
                p.start()
                res[method] = q.get(timeout=3600)
                p.join()
                rss, sec = res[method]
                print(f"| {name} | {method} | {rss:.0f} MiB | {sec:.3f} | {rss / res['full fine-tuning'][0]:.2f} | "
                      f"{res.get('full-depth LoRA', (0, sec))[1] / sec:.2f}x |", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["gain", "memory"], default="gain")
    ap.add_argument("--batch", type=int, help="sequences per step (memory phase: default 4; gain phase: coexit "
                                              "adapt's)")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (memory phase: default 256; gain phase: "
                                                "coexit adapt's)")
    ap.add_argument("--steps-memory", type=int, default=4, help="memory phase: steps per window")
    ap.add_argument("--package", help="a directory of Python source held out of the corpus (default: aiohttp's)")
    ap.add_argument("--steps", type=int, help="adapt steps per window (default: coexit adapt's)")
    ap.add_argument("--tokens", type=int, default=16384, help="held-out test tokens")
    ap.add_argument("--target", type=float, default=0.99, help="calibration agreement target")
    ap.add_argument("--consistency", type=float, help="coexit adapt's split-row drift weight (default: its own)")
    ap.add_argument("--lr", type=float, help="coexit adapt's (peak) learning rate (default: its own)")
    ap.add_argument("--base-dtype", choices=["fp32", "bf16"], default="fp32", help="coexit adapt's --base-dtype")
    ap.add_argument("--rank", type=int, help="coexit adapt's LoRA rank (default: its own)")
    ap.add_argument("--alpha", type=float, help="coexit adapt's LoRA alpha (default: its own)")
    ap.add_argument("--joint-steps", type=int, help="coexit adapt's final joint pass, steps (default: its own)")
    ap.add_argument("--weight-decay", type=float, help="coexit adapt's AdamW weight decay (default: its own)")
    ap.add_argument("--lr-schedule", choices=SCHEDULES,
                    help="coexit adapt's learning-rate schedule over each window (default: its own)")
    ap.add_argument("--calib-files", type=float, default=0.0,
                    help="share of the files to adapt on kept out of adapting and used (instead of every one of "
                         "them) to calibrate both models: thresholds fit on text the adapter did not learn")
    args = ap.parse_args()
    if args.phase == "memory":
        args.batch, args.seq_len = args.batch or 4, args.seq_len or 256
        return memory_phase(args)
    own = inspect.signature(adapt).parameters  # coexit adapt's defaults, unless given
    for name in ("steps", "consistency", "lr", "lr_schedule"):
        if getattr(args, name) is None:
            setattr(args, name, own[name].default)
    knobs = {k: v for k, v in (("r", args.rank), ("alpha", args.alpha), ("joint_steps", args.joint_steps),
                               ("weight_decay", args.weight_decay), ("batch", args.batch),
                               ("seq_len", args.seq_len)) if v is not None}
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))  # 2 unless the caller limits the threads
    pkg = Path(args.package) if args.package else Path(importlib.util.find_spec("aiohttp").origin).parent
    files = sorted(p for p in pkg.rglob("*.py") if p.stat().st_size > 200)
    random.Random(0).shuffle(files)
    cut = int(0.8 * len(files))
    train, test = files[:cut], files[cut:]
    base = coexit.load(MODEL)
    cfg = base.config
    exits = list(cfg.edge_exit_layers)
    tok = base.tokenizer
    test_docs = [f.read_text(errors="replace") for f in test]
    n_calib = int(args.calib_files * len(train))
    calib, train = train[:n_calib], train[n_calib:]
    train_docs = [f.read_text(errors="replace") for f in train]
    calib_docs = [f.read_text(errors="replace") for f in calib] or train_docs
    chunks = spread_chunks(tok, test_docs, args.tokens, 257, min_len=257)
    print(f"package {pkg.name}: {len(train)} files to adapt on, {len(calib) or 'the same'} to calibrate on, "
          f"{len(test)} held out ({sum(map(len, chunks))} "
          f"tokens); {args.steps} adapt steps per window, consistency {args.consistency}, lr {args.lr} "
          f"({args.lr_schedule}), base "
          f"{args.base_dtype}{''.join(f', {k} {v}' for k, v in knobs.items())}")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        adapt(MODEL, [str(f) for f in train], Path(tmp) / "adapter", steps=args.steps, heldout=0.0, progress=False,
              consistency=args.consistency, lr=args.lr, lr_schedule=args.lr_schedule, **knobs,
              base_dtype=torch.bfloat16 if args.base_dtype == "bf16" else torch.float32)
        seconds = time.perf_counter() - t0
        tuned = coexit.load(MODEL)
        merge_adapter(tuned, Path(tmp) / "adapter")
    rows = {}
    for name, model in (("before", base), ("after", tuned)):
        for reference in REFERENCES:  # the same target, judged against the cloud's token / the real next token
            stats = collect(model, calib_docs, exits, "max_prob", max_tokens=30_000, reference=reference)
            thresholds, _ = choose_thresholds(stats, exits, args.target, "max_prob")
            r = evaluate(model, chunks, exits, thresholds)
            if reference == "cloud":
                rows[name] = r
                rows[name]["thresholds"] = {e: round(t, 3) for e, t in thresholds.items() if t is not None}
            else:
                for k in POLICY_ROWS:
                    rows[name][f"{k}, reference text"] = r[k]
                rows[name]["thresholds, reference text"] = {e: round(t, 3) for e, t in thresholds.items()}
    print(f"adapting took {seconds:.0f} s on this CPU\n")
    print("| measure | before | after |\n|---|---|---|")
    for k in rows["before"]:
        a, b = rows["before"][k], rows["after"][k]
        fmt = (lambda v: f"{v:.2%}") if isinstance(a, float) else str
        print(f"| {k} | {fmt(a)} | {fmt(b)} |")
    print(f"\ncloud-only top-1 (unadapted, the bar): {rows['before']['cloud top-1 (all)']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
