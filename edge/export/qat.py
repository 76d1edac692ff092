"""Quantization-aware fine-tuning of the edge (`coexit export-edge --policy FILE --qat STEPS`): the edge layers'
weights are trained against the fp32 model with every matrix fake-quantized to its policy type exactly as
llama.cpp's quantizer will store it, and the tuned weights are then exported with that policy.

- Fake quantization: each step, every edge matrix's latent fp32 weight W is rounded by llama.cpp's own quantizer
  (quant_types.quantize: `ggml_quantize_chunk` with the policy's importance matrix, the call llama_model_quantize
  makes per tensor) and dequantized (gguf-py), so the forward pass sees the exported file's values bit for bit;
  the gradient passes straight through to W (STE). Scales and codes are re-chosen from W every step, as the
  export will choose them. The token embedding and the heads take their policy types (q8_0) frozen.
- Trained: the edge matrices, the edge layers' RMSNorm weights and the edge exits' norms (f32 in the file: the
  blocks' attn_norm / ffn_norm, the split exit's output_norm, earlier exits' coexit.exit_norm.E metadata).
- Loss, on calibration text (never the evaluation text): KL(fp32 || quantized) of every edge exit head's
  next-token distribution, plus `mse` x the split rows' squared error relative to their fp32 squared norm (the
  hidden states the cloud answers from); with `system`, also the final head's KL when the fp32 deep layers run
  on the quantized split rows.
- Export: `qat_weights` returns the tuned tensors (torch parameter names); edge/export/gguf.py's `weights=`
  writes them instead of the checkpoint's (the fingerprint stays the checkpoint's: the cloud is unchanged), and
  llama.cpp's quantizer then writes exactly the values the last training step used (tests/edge/test_qat.py).
Settings (default model, CPU): Adam at 1e-5 with cosine decay, 4 x 256-token batches, `mse` 0.3; 2e-5 and 3e-5
left the exit KL on a calibration batch worse after 60-80 steps, and a per-matrix rate scaled to each type's grid
step did no better. 60 steps take 3-4 minutes on one core; 150 steps cut the calibration KL by 60% (60 steps: 33%)
but moved held-out agreement by only 0.1-0.3 points more; at 5.0 bpw, 500 and 800 steps on fresh sequences
(`coexit export-edge` draws STEPS x 4 x 256 calibration tokens by default) gave 94.91% and 95.20% emitted = fp32
against 150 steps' 94.53%. The measured gain: bench/quant_mix.py's "+qat" rows, bench/results/quant_mix.txt.
"""

from __future__ import annotations

import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edge.export.imatrix import LINEAR_NAMES
from edge.export.quant_types import fake_quantize
from edge.export.rounding import StepProgress, calibration, export_rounded


class _Straight(torch.autograd.Function):
    """Forward: the rounded values exactly (w + (q - w).detach() is off by an ulp); backward: the identity."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class FakeQuant(torch.nn.Module):
    """A weight parametrization: the latent weight W, used as llama.cpp's rounding of it (`cached`, refreshed by
    `refresh`), with W's gradient passed straight through."""

    def __init__(self, qtype: str, imatrix: np.ndarray | None) -> None:
        super().__init__()
        self.qtype, self.imatrix, self.cached = qtype, imatrix, None

    def refresh(self, w: torch.Tensor) -> None:
        self.cached = torch.from_numpy(fake_quantize(w.detach().numpy(), self.qtype, self.imatrix))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.cached is None:
            self.refresh(w)
        return _Straight.apply(w, self.cached)


def _kl(got: torch.Tensor, want_logp: torch.Tensor) -> torch.Tensor:
    """KL(want || got) per position, from logits `got` and log-probs `want_logp` (B, T, V)."""
    return F.kl_div(F.log_softmax(got, -1).flatten(0, 1), want_logp.flatten(0, 1), log_target=True,
                    reduction="batchmean")


def targets(model, policy, imatrix: dict[str, np.ndarray] | None) -> dict[str, tuple[torch.nn.Module, str, object]]:
    """GGUF name -> (nn.Linear, policy type, imatrix entry) for every edge matrix."""
    out = {}
    for i in range(model.config.split_layer):
        blk = model.model.layers[str(i)]
        for sub, kind in LINEAR_NAMES.items():
            name = f"blk.{i}.{kind}.weight"
            out[name] = (blk.get_submodule(sub), policy.types[name], (imatrix or {}).get(name))
    return out


def qat_weights(model_dir: str | Path, policy, calib: list[list[int]], steps: int, *, lr: float = 1e-5,
                batch: int = 4, mse: float = 0.3, system: bool = False, norms: bool = True, seed: int = 0,
                threads: int = 2, log=print, progress: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Fine-tune the edge of `model_dir` with `policy`'s fake quantization for `steps` Adam steps (cosine decay
    from `lr`) of `batch` calibration sequences. Returns (tuned tensors by torch parameter name, info: loss at the
    start and the end, seconds)."""
    from torch.nn.utils import parametrize

    from coexit.checkpoint import load, read_config
    from edge.export.imatrix import Imatrix
    from edge.export.policy import Policy

    model_dir = Path(model_dir)
    policy = policy if isinstance(policy, Policy) else Policy.load(policy)
    cfg = read_config(model_dir)
    split, n_layers = cfg.split_layer, cfg.num_hidden_layers
    exits = [e for e in cfg.exit_layers if e <= split]
    ref = load(model_dir, layers=None if system else (0, split), dtype=torch.float32)
    model = load(model_dir, layers=(0, split), dtype=torch.float32)
    if policy.fingerprint != model.fingerprint:
        raise ValueError(f"the policy was chosen for another checkpoint (fingerprint {policy.fingerprint[:12]}, "
                         f"this one {model.fingerprint[:12]})")
    for p in [*ref.parameters(), *model.parameters()]:
        p.requires_grad_(False)
    im = Imatrix.load(model_dir / policy.imatrix).values() if policy.imatrix else None
    with torch.no_grad():  # the embedding and heads as the file stores them (frozen)
        emb = model.model.embed_tokens.weight
        emb.copy_(torch.from_numpy(fake_quantize(emb.numpy(), policy.heads["token_embd.weight"])))
        for e in exits:
            head = model.exits[str(e)]
            if hasattr(head, "lm_head"):  # a sidecar head: Q8_0 (edge/export/gguf.py write_sidecar)
                head.lm_head.weight.copy_(torch.from_numpy(fake_quantize(head.lm_head.weight.numpy(), "q8_0")))
    mats = targets(model, policy, im)
    fqs = []
    for _name, (mod, t, imx) in mats.items():
        fq = FakeQuant(t, imx)
        parametrize.register_parametrization(mod, "weight", fq, unsafe=True)
        mod.parametrizations.weight.original.requires_grad_(True)
        fqs.append((fq, mod.parametrizations.weight.original))
    params = [w for _, w in fqs]
    norm_params = []
    if norms:
        for i in range(split):
            blk = model.model.layers[str(i)]
            norm_params += [blk.input_layernorm.weight, blk.post_attention_layernorm.weight]
        norm_params += [model.exits[str(e)].norm.weight for e in exits]
        for p in norm_params:
            p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": params, "lr": lr}, {"params": norm_params, "lr": lr}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    pool = ThreadPoolExecutor(max(1, threads))  # ggml's quantizer runs outside the GIL
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        return _train(model, ref, mats, fqs, norm_params, opt, sched, pool, calib, steps, batch, seed, split, n_layers,
                      exits, mse, system, log, progress)
    finally:
        torch.set_num_threads(torch_threads)
        pool.shutdown()


def _train(model, ref, mats, fqs, norm_params, opt, sched, pool, calib, steps, batch, seed, split, n_layers, exits,
           mse, system, log, progress):
    def refresh() -> None:
        list(pool.map(lambda fw: fw[0].refresh(fw[1]), fqs))

    def loss_of(x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            r = ref.stage(0, split)(x, exits=exits)
            want = {e: F.log_softmax(r.exit_logits[e], -1) for e in exits}
            want_final = (F.log_softmax(ref.run_layers(r.hidden, None, None, split, n_layers).logits, -1)
                          if system else None)
            h_norm = r.hidden.pow(2).sum(-1).mean()
        o = model.stage(0, split)(x, exits=exits)
        parts = {f"exit.{e}": _kl(o.exit_logits[e], want[e]) for e in exits}
        parts["split_mse"] = (o.hidden - r.hidden).pow(2).sum(-1).mean() / h_norm
        loss = sum(v for k, v in parts.items() if k != "split_mse") + mse * parts["split_mse"]
        if system:
            parts["final"] = _kl(ref.run_layers(o.hidden, None, None, split, n_layers).logits, want_final)
            loss = loss + parts["final"]
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    rng, start = random.Random(seed), time.time()
    held = torch.tensor(random.Random(seed + 1).sample(calib, min(batch, len(calib))))
    refresh()
    with torch.no_grad():
        before = loss_of(held)[1]
    shown = StepProgress("qat", steps, log, progress)
    for step in range(steps):
        x = torch.tensor(rng.sample(calib, min(batch, len(calib))))
        if step:
            refresh()
        loss, parts = loss_of(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        shown.step(step, f"{len(fqs)} matrices, {steps} steps of {x.shape[0]} x {x.shape[1]} tokens", "loss", loss)
    shown.close()
    refresh()
    with torch.no_grad():
        after = loss_of(held)[1]
    out = {}
    for mod, _, _ in mats.values():
        out[_param_name(model, mod) + ".weight"] = mod.parametrizations.weight.original.detach().clone()
    for p in norm_params:
        out[_param_name(model, p)] = p.detach().clone()
    return out, {"before": before, "after": after, "seconds": round(time.time() - start, 1), "steps": steps}


def _param_name(model, obj) -> str:
    for n, m in model.named_modules():
        if m is obj:
            return n
    for n, p in model.named_parameters():
        if p is obj:
            return n
    raise KeyError("not in the model")


def describe(steps: int, info: dict, calib: list[list[int]], text) -> str:
    """The GGUF metadata value (coexit.qat) recording how the weights were tuned."""
    b, a = info["before"], info["after"]
    return (f"{steps} steps x 4 x {len(calib[0])} tokens of {len(calib)} sequences of "
            f"{', '.join(str(t) for t in text)}; llama.cpp-exact fake quantization, edge-exit KL + split-row MSE "
            f"to fp32; held-out batch exit KL {sum(v for k, v in b.items() if k.startswith('exit')):.5f} -> "
            f"{sum(v for k, v in a.items() if k.startswith('exit')):.5f}")


def export_qat(model_dir: str | Path, policy, out: str | Path | None, threads: int, *, steps: int,
               text: list[str], tokens: int = 65536, layout: str = "whole", rounding: int = 0, log=print,
               **train) -> Path:
    """Tune the edge with `policy`'s fake quantization for `steps` steps on `tokens` tokens of calibration `text`,
    then export it with the policy (a whole file, or segments), recording the tuning as coexit.qat; with
    `rounding` > 0, learned rounding (edge/export/rounding.py) follows from the tuned weights."""
    from edge.export.gguf import export_gguf
    from edge.export.segments import export_segments

    calib = calibration(model_dir, text, tokens)
    weights, info = qat_weights(model_dir, policy, calib, steps, threads=threads, log=log, progress=True, **train)
    b, a = info["before"], info["after"]
    log(f"qat: {info['seconds']:.0f} s; held-out calibration batch " +
        ", ".join(f"{k} {b[k]:.5f} -> {a[k]:.5f}" for k in b))
    meta = {"coexit.qat": describe(steps, info, calib, text)}
    if rounding:
        return export_rounded(model_dir, "policy", out, threads, steps=rounding, text=text, tokens=tokens,
                              layout=layout, log=log, policy=policy, weights=weights, meta=meta)
    if layout == "whole":
        return export_gguf(model_dir, out=out, threads=threads, policy=policy, weights=weights, meta=meta)
    return export_segments(model_dir, "policy", out, threads, policy=policy, weights=weights, meta=meta)
