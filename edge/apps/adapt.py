"""`coexit adapt --model DIR --data PATH... --out ADAPTER_DIR`: adapt the edge layers to the user's own text on the
device, as Edge-LLM's adaptive layer tuning does: LoRA adapters on every linear, trained one window of layers at a
time, shallow to deep, each window closing at an edge exit whose loss trains it. Rank 32, alpha 64 (Edge-LLM uses
r 8, alpha 16; on held-out files of a package the bundled model never saw, r 32 lifted the exits about a point more,
r 64 overfit: bench/results/adapt.txt). When the text holds fewer tokens than the steps take, all of it is used,
not only each document's share. `--joint-steps` adds a last pass over every edge layer's adapters with the loss
summed over the edge exits (its memory is full-depth LoRA's; it gained nothing there, so it is off by default).

Each window takes 300 AdamW steps at a peak learning rate of 3e-3 on a cosine schedule (`--lr-schedule`: a linear
warmup over its first 10%, then a half cosine down to 10% of the peak at its last step). That is what lifted the
split exit by 3 points on aiohttp's held-out files: a constant 1e-3 (the schedule before) gave 2.3
at 150 steps and 2.9 at 300, and 450 steps overfit. It was picked on those files; on a second package (deepspeed)
both settings gain over 10 points and the old one more, in half the time (bench/results/adapt.txt).

Memory is bounded by the window: the layers below it run without autograd, the forward stops at the window's exit,
only the window's adapters are trainable, and each layer of the window keeps only its input for the backward pass
(activation checkpointing: its inside is recomputed). The frozen base is held in bf16 where the CPU computes bf16
natively (`--base-dtype auto`; the adapters stay fp32). The cloud's deep layers are shared and not adapted, so the
split rows the edge uploads must not drift: each window also pays a consistency term, the relative squared drift of
its output hidden state from the unadapted model's on the same tokens (its output feeds every deeper layer, the
split rows included), computed by the same model with its adapters switched off (no second copy of the weights).
Weight 3 by default: it also regularises; on held-out files the split exit scored higher at 3 than at 1 or 0, exit 2
the same as at 1, and the edge share rose (at 10 exit 2 fell back; bench/results/adapt.txt). `--consistency 0` turns
it off.

The result is a PEFT-layout adapter directory (coexit.lora) that every edge backend takes (`--adapter`); after each
window it is saved with the windows done, so an interrupted run resumes where it stopped. Held-out text (a share of
the documents) gives each window's exit loss before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute
from tqdm import tqdm

from coexit.checkpoint import load, read_config
from coexit.errors import UsageError
from coexit.lora import (
    CONFIG_FILE,
    TARGETS,
    LoraConfig,
    LoRALinear,
    add_lora,
    lora_disabled,
    read_adapter,
    save_adapter,
    set_lora,
)
from coexit.textdata import read_documents, spread_chunks


def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (x86 AVX512-BF16 or AMX-BF16, Arm BF16), so a bf16 base is fast."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = {w for line in text.splitlines() if line.startswith(("flags", "Features")) for w in line.split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def windows(exits: list[int]) -> list[tuple[int, int]]:
    """Layer windows [lo, hi), each closing at an edge exit hi (the last at the split)."""
    bounds = [0, *sorted(exits)]
    return [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


SCHEDULES = ("constant", "cosine")
WARMUP = 0.1  # the cosine schedule's linear warmup, as a share of the window's steps
FINAL_LR = 0.1  # ... and the share of the peak learning rate it decays to at the window's last step


def lr_scale(step: int, steps: int, schedule: str = "constant") -> float:
    """The learning rate of optimizer step `step` (0-based) of a window of `steps`, as a share of the peak.

    "constant": 1 throughout. "cosine": a linear warmup over the first WARMUP of the steps (1 / w at step 0, 1 at the
    warmup's last step), then a half cosine from 1 down to FINAL_LR at the last step."""
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    w = max(1, round(WARMUP * steps))
    if step < w:
        return (step + 1) / w
    p = min(1.0, (step - w + 1) / max(1, steps - w))
    return FINAL_LR + (1.0 - FINAL_LR) * 0.5 * (1.0 + math.cos(math.pi * p))


def _batches(chunks: list[list[int]], batch: int, rng: random.Random):
    while True:
        rng.shuffle(chunks)
        for i in range(0, len(chunks) - batch + 1, batch):
            yield torch.tensor(chunks[i:i + batch])


def window_loss(model, lo: int, hi: int, ids: torch.Tensor, consistency: float = 0.0,
                checkpoint: bool = True, exits: tuple[int, ...] = ()) -> torch.Tensor:
    """The training loss of window [lo, hi) on a batch of token ids (B, T + 1): next-token cross-entropy at exit hi,
    plus that of each other exit in `exits` inside the window (the joint pass), plus the consistency term. Layers
    below lo run without autograd; with `checkpoint`, each window layer keeps only its input for the backward
    pass."""
    x, y = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():  # the layers below the window: no autograd graph, no activations kept
        e = model.embed(x)
        h = model.run_layers(e, 0, None, 0, lo).hidden if lo else e
        if consistency:
            with lora_disabled(model):  # the unadapted edge's output at the window's top
                target = model.run_layers(e, 0, None, 0, hi).hidden.float()
    loss = 0.0
    for i in range(lo, hi):
        def layer(t, i=i):
            return model.run_layers(t, 0, None, i, i + 1).hidden
        h = recompute(layer, h, use_reentrant=False) if checkpoint else layer(h)
        if i + 1 in exits and i + 1 < hi:
            loss = loss + F.cross_entropy(model.head_logits(i + 1, h).flatten(0, 1).float(), y.flatten())
    loss = loss + F.cross_entropy(model.head_logits(hi, h).flatten(0, 1).float(), y.flatten())
    if consistency:
        loss = loss + consistency * ((h.float() - target) ** 2).mean() / (target ** 2).mean()
    return loss


@torch.no_grad()
def exit_loss(model, chunks: list[list[int]], exit_layer: int, batch: int = 8) -> float:
    """Mean next-token cross-entropy of an edge exit over held-out chunks."""
    stage, total, n = model.stage(0, exit_layer), 0.0, 0
    for i in range(0, len(chunks), batch):
        ids = torch.tensor(chunks[i:i + batch])
        logits = stage(ids[:, :-1], exits=[exit_layer]).exit_logits[exit_layer]
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"))
        n += ids[:, 1:].numel()
    return total / max(1, n)


def adapt(model_dir, data: list[str], out, steps: int = 300, seq_len: int = 128, batch: int = 8, lr: float = 3e-3,
          r: int = 32, alpha: float = 64.0, consistency: float = 3.0, heldout: float = 0.1, seed: int = 0,
          progress: bool = True, base_dtype: torch.dtype = torch.float32, checkpoint: bool = True,
          joint_steps: int = 0, weight_decay: float = 0.0, lr_schedule: str = "cosine") -> dict:
    """Train (or resume) the adapter in `out`; returns the per-window report written beside it. `lr_schedule`
    (lr_scale) restarts with each window and with the joint pass."""
    lr_scale(0, 1, lr_schedule)  # an unknown schedule fails before any work
    torch.manual_seed(seed)
    cfg0 = read_config(model_dir)
    split, exits = cfg0.split_layer, cfg0.edge_exit_layers
    model = load(model_dir, layers=(0, split), dtype=base_dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    tok = model.tokenizer
    if tok is None:
        raise UsageError(f"{model_dir} has no tokenizer.json: adapting needs it to read the text")
    docs = read_documents(data)
    rng = random.Random(seed)
    rng.shuffle(docs)
    n_held = max(1, int(len(docs) * heldout)) if len(docs) > 1 else 0
    held_docs, train_docs = docs[:n_held], docs[n_held:] or docs
    want = steps * batch * seq_len
    train = spread_chunks(tok, train_docs, want, seq_len + 1, min_len=seq_len + 1)
    if sum(map(len, train)) < want:  # less text than the steps take: all of it, not the per-document share
        train = spread_chunks(tok, train_docs, want, seq_len + 1, per_doc=want, min_len=seq_len + 1)
    held = spread_chunks(tok, held_docs, 64 * seq_len, seq_len + 1, min_len=seq_len + 1) if held_docs else []
    if len(train) < batch:
        raise UsageError(f"the data holds {len(train)} chunks of {seq_len + 1} tokens, fewer than one batch of "
                         f"{batch}: give more text or a smaller --seq-len / --batch")
    out = Path(out)
    lora = LoraConfig(r, alpha, TARGETS, tuple(range(split)), model.fingerprint,
                      {"windows": [list(w) for w in windows(exits)], "windows_done": [], "consistency": consistency,
                       "steps_per_window": steps, "seq_len": seq_len, "batch": batch, "lr": lr,
                       "joint_steps": joint_steps, "joint_done": False, "weight_decay": weight_decay,
                       "lr_schedule": lr_schedule})
    done: list[list[int]] = []
    joint_done = False
    if (out / CONFIG_FILE).is_file():  # resume: the windows already trained come back as they were saved
        old, weights = read_adapter(out)
        if old.base_fingerprint != model.fingerprint:
            raise UsageError(f"{out} holds an adapter of another checkpoint; choose another --out")
        done = old.extra.get("windows_done", [])
        joint_done = bool(old.extra.get("joint_done", False))
        r = lora.r = old.r  # the saved windows' rank and alpha, whatever this run's defaults are
        alpha = lora.alpha = old.alpha
        add_lora(model, LoraConfig(r, alpha, TARGETS, tuple(i for lo, hi in done for i in range(lo, hi))))
        set_lora(model, weights)
    todo = [w for w in windows(exits) if list(w) not in done]
    report = {"windows": []}
    joint = joint_steps > 0 and not joint_done
    bar = tqdm(total=steps * len(todo) + joint_steps * joint, desc="adapting", unit="step", disable=not progress)
    batches = _batches(train, batch, rng)

    def tune(params, lo, hi, n, also=()):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        before = exit_loss(model, held, hi) if held else math.nan
        t0, last = time.perf_counter(), 0.0
        for step in range(n):
            for group in opt.param_groups:
                group["lr"] = lr * lr_scale(step, n, lr_schedule)
            loss = window_loss(model, lo, hi, next(batches), consistency, checkpoint, also)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = float(loss.detach())
            bar.update(1)
            bar.set_postfix(window=f"[{lo},{hi})", loss=f"{last:.3f}")
        after = exit_loss(model, held, hi) if held else math.nan
        return {"window": [lo, hi], "exit": hi, "heldout_loss_before": before, "heldout_loss_after": after,
                "train_loss_last": last, "seconds": time.perf_counter() - t0}

    for lo, hi in todo:
        mods = add_lora(model, LoraConfig(r, alpha, TARGETS, tuple(range(lo, hi))))
        row = tune([p for m in mods for p in (m.lora_A, m.lora_B)], lo, hi, steps)
        done.append([lo, hi])
        lora.extra["windows_done"] = done
        save_adapter(model, lora, out)  # a checkpoint per window: an interrupted run resumes here
        report["windows"].append(row)
    if joint:  # every edge layer's adapters at once, the loss summed over the edge exits
        params = [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]
        report["windows"].append(tune(params, 0, split, joint_steps, tuple(exits)) | {"joint": True})
        lora.extra["joint_done"] = True
        save_adapter(model, lora, out)
    bar.close()
    report.update(chunks_train=len(train), chunks_heldout=len(held))
    (out / "adapt_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str]) -> int:
    from coexit.cli import HelpFormatter

    ap = argparse.ArgumentParser(prog="coexit adapt", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--data", nargs="+", required=True, help="text files, directories of source, or .jsonl")
    ap.add_argument("--out", required=True, help="adapter directory to write (or resume)")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per window")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW (peak) learning rate of the adapters")
    ap.add_argument("--lr-schedule", choices=SCHEDULES, default="cosine",
                    help=f"the learning rate over each window's steps: constant, or cosine (a linear warmup over "
                         f"{WARMUP * 100:g}%% of them, then a cosine decay to {FINAL_LR * 100:g}%% of --lr)")
    ap.add_argument("--rank", type=int, default=32,
                    help="LoRA rank r (Edge-LLM's 8 gained less on held-out code: bench/results/adapt.txt)")
    ap.add_argument("--alpha", type=float, default=64.0, help="LoRA alpha (the update is scaled by alpha / r)")
    ap.add_argument("--consistency", type=float, default=3.0,
                    help="weight of the split-row drift penalty that keeps the cloud's answers right (0: off); it "
                         "also regularises: 3 gained more on held-out files than 0, 1 or 10")
    ap.add_argument("--base-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                    help="the frozen base weights while tuning: bf16 halves their memory (the adapters stay fp32); "
                         "auto: bf16 where the CPU computes bf16 natively, else fp32")
    ap.add_argument("--joint-steps", type=int, default=0,
                    help="after the windows, steps of one pass over every edge layer's adapters with the loss summed "
                         "over the edge exits (its memory is full-depth LoRA's, not a window's; 0: none)")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of the adapters")
    ap.add_argument("--heldout", type=float, default=0.1, help="share of the documents held out for the report")
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the batches")
    args = ap.parse_args(argv)
    for flag, value in (("--steps", args.steps), ("--seq-len", args.seq_len), ("--batch", args.batch),
                        ("--rank", args.rank)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if not 0 <= args.heldout < 1 or args.consistency < 0 or not args.lr > 0 or args.joint_steps < 0 \
            or args.weight_decay < 0:
        raise UsageError("--heldout must be in [0, 1), --consistency >= 0, --lr > 0, --joint-steps >= 0 and "
                         "--weight-decay >= 0")
    read_config(args.model)
    r = adapt(args.model, args.data, args.out, args.steps, args.seq_len, args.batch, args.lr, args.rank,
              args.alpha, args.consistency, args.heldout, args.seed,
              base_dtype=torch.bfloat16 if args.base_dtype == "bf16" or (args.base_dtype == "auto" and native_bf16())
              else torch.float32, joint_steps=args.joint_steps, weight_decay=args.weight_decay,
              lr_schedule=args.lr_schedule)
    for w in r["windows"]:
        what = "joint pass" if w.get("joint") else "window"
        print(f"{what} {w['window']} (exit {w['exit']}): held-out exit loss {w['heldout_loss_before']:.3f} -> "
              f"{w['heldout_loss_after']:.3f} in {w['seconds']:.0f} s")
    print(f"wrote {args.out} (PEFT layout; use it with --adapter)")
    return 0
