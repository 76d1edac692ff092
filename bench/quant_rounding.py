"""Learned rounding on llama.cpp's own grid: how much split-exit top-1 agreement the codes alone buy back.

An experiment behind #14's Q4 line (bench/results/quant_mix.txt), kept so that its figures can be reproduced.
For every matrix of a quantized edge GGUF (edge/export/gguf.py), the block scales and mins that llama.cpp's
quantizer chose are kept and only the integer codes are chosen anew:
- latent weights w = w_fp32 + a * delta (a: the element's grid step), whose nearest grid value the forward pass
  uses (straight-through gradient), trained with Adam to minimise KL(fp32 split exit || quantized split exit) on
  calibration text; the file's f32 RMSNorm weights train too;
- the codes are written back into the GGUF's blocks in place (Q8_0, Q4_0, IQ4_NL, Q5_0, Q4_K, Q6_K; every
  rewritten tensor is checked against gguf-py's dequantizer), and llama.cpp's own logits are scored.

    python bench/quant_rounding.py --model models/coexit-code-small --quant q4-mix \\
        --calib data/corpus/train.jsonl --text data/corpus/heldout.jsonl [--steps 300]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quant_mix import emit_agreement, eval_chunks, llama_top1, torch_top1  # noqa: E402

T = gguf.GGMLQuantizationType
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _f16(blk: np.ndarray, at: int) -> np.ndarray:
    return blk[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def grid(data: np.ndarray, qtype: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A quantized tensor's grid: value = a * levels[code] + b, with a, b (rows, cols) from its block scales."""
    def per(x, k):
        return np.repeat(x, k, axis=1).reshape(rows, cols)

    zero, ar = np.zeros((rows, cols), np.float32), np.arange
    if qtype == T.Q8_0:
        return per(_f16(data.reshape(-1, 34), 0), 32), zero, ar(-128, 128)
    if qtype in (T.Q4_0, T.IQ4_NL):
        return per(_f16(data.reshape(-1, 18), 0), 32), zero, ar(-8, 8) if qtype == T.Q4_0 else np.array(IQ4_LEVELS)
    if qtype == T.Q5_0:
        return per(_f16(data.reshape(-1, 22), 0), 32), zero, ar(-16, 16)
    if qtype == T.Q4_K:
        blk = data.reshape(-1, 144)
        sc, m = gguf.quants.Q4_K.get_scale_min(blk[:, 4:16].copy())
        return per(_f16(blk, 0) * sc, 32), -per(_f16(blk, 2) * m, 32), ar(0, 16)
    if qtype == T.Q6_K:
        blk = data.reshape(-1, 210)
        return per(_f16(blk, 208) * blk[:, 192:208].copy().view(np.int8), 16), zero, ar(-32, 32)
    raise ValueError(f"no grid for {T(qtype).name}")


def _nibbles(q: np.ndarray) -> np.ndarray:  # (n, 32) codes -> 16 bytes: elements 0..15 low, 16..31 high
    q = q.reshape(-1, 2, 16).astype(np.uint8)
    return q[:, 0] | (q[:, 1] << 4)


def encode(data: np.ndarray, qtype: int, q: np.ndarray) -> None:
    """Write level indices q (rows, cols) into the tensor's blocks in place; the scale bytes stay."""
    if qtype == T.Q8_0:
        data.reshape(-1, 34)[:, 2:] = (q.reshape(-1, 32) - 128).astype(np.int8).view(np.uint8)
    elif qtype in (T.Q4_0, T.IQ4_NL):
        data.reshape(-1, 18)[:, 2:] = _nibbles(q)
    elif qtype == T.Q5_0:
        blk, qq = data.reshape(-1, 22), q.reshape(-1, 32).astype(np.uint32)
        blk[:, 6:] = _nibbles(qq & 15)
        high = ((qq >> 4) << np.arange(32, dtype=np.uint32)).sum(1, dtype=np.uint32)
        blk[:, 2:6] = high.view(np.uint8).reshape(-1, 4)
    elif qtype == T.Q4_K:
        qq = q.reshape(-1, 4, 2, 32).astype(np.uint8)
        data.reshape(-1, 144)[:, 16:] = (qq[:, :, 0] | (qq[:, :, 1] << 4)).reshape(-1, 128)
    elif qtype == T.Q6_K:
        blk, qq = data.reshape(-1, 210), q.reshape(-1, 256).astype(np.uint8)
        lo = (qq & 15).reshape(-1, 2, 2, 64)
        blk[:, :128] = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
        hi = (qq >> 4).reshape(-1, 2, 4, 32)
        blk[:, 128:192] = (hi[:, :, 0] | hi[:, :, 1] << 2 | hi[:, :, 2] << 4 | hi[:, :, 3] << 6).reshape(-1, 64)
    else:
        raise ValueError(f"cannot encode {T(qtype).name}")


BLOCK_BYTES = {T.Q8_0: 34, T.Q4_0: 18, T.IQ4_NL: 18, T.Q5_0: 22}  # one f16 scale d first, per 32 weights


def set_scales(data: np.ndarray, qtype: int, d: np.ndarray) -> None:
    """Write per-block scales d (rows, cols / 32) of a single-scale 32-weight block type, in place."""
    data.reshape(-1, BLOCK_BYTES[qtype])[:, :2] = d.reshape(-1, 1).astype(np.float16).view(np.uint8)


class OnGrid(torch.nn.Module):
    """A weight parametrization: latent w0 + a * delta, used as its nearest grid value (straight-through).
    With `scales`, each 32-weight block's step a also trains (log-scale, rounded to f16 as stored)."""

    def __init__(self, w0: torch.Tensor, a: np.ndarray, b: np.ndarray, levels: np.ndarray,
                 scales: bool = False) -> None:
        super().__init__()
        self.w0, self.a0, self.b = w0.clone(), torch.from_numpy(a).float(), torch.from_numpy(b).float()
        self.levels = torch.from_numpy(levels.astype(np.float32))
        self.mids = (self.levels[1:] + self.levels[:-1]) / 2
        self.delta = torch.nn.Parameter(torch.zeros_like(w0))
        self.logs = torch.nn.Parameter(torch.zeros(w0.shape[0], w0.shape[1] // 32)) if scales else None

    def step(self) -> torch.Tensor:
        if self.logs is None:
            return self.a0
        a = self.a0 * torch.exp(self.logs).repeat_interleave(32, dim=1)
        return a + (a.half().float() - a).detach()

    def codes(self, a: torch.Tensor | None = None) -> torch.Tensor:
        a = (self.step() if a is None else a).detach()
        w = (self.w0 + self.a0 * self.delta).detach()
        return torch.bucketize((w - self.b) / torch.where(a == 0, 1, a), self.mids)

    def forward(self, _w: torch.Tensor) -> torch.Tensor:
        a = self.step()
        w = self.w0 + self.a0 * self.delta
        q = self.levels[self.codes(a)]
        return w + (a.detach() * q + self.b - w).detach() + (a - a.detach()) * q


def _kl(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """KL(want || got) per position, from logits (B, T, V)."""
    return F.kl_div(F.log_softmax(got, -1).flatten(0, 1), F.log_softmax(want, -1).flatten(0, 1), log_target=True,
                    reduction="batchmean")


def tune(model_dir: Path, path: Path, calib: list[list[int]], steps: int, lr: float, batch: int,
         seed: int = 0, scales: bool = False, system: bool = False, log=print) -> None:
    """Re-choose the codes (and the norm weights) of the edge GGUF at `path`, in place. The loss is the split
    exit's KL to fp32; with `system`, plus the final head's KL when the fp32 deep layers run on the quantized
    edge's split rows (what the cloud computes from them)."""
    from coexit.checkpoint import load, read_config
    from edge.export.gguf import permute_qk, unpermute_qk
    from edge.export.imatrix import LINEAR_NAMES

    cfg = read_config(model_dir)
    split = cfg.split_layer
    ref = load(model_dir, layers=None if system else (0, split), dtype=torch.float32)
    model = load(model_dir, layers=(0, split), dtype=torch.float32)
    for p in ref.parameters():
        p.requires_grad_(False)
    n_layers = cfg.num_hidden_layers
    head = model.exits[str(split)]
    head.lm_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # `output` is its own tensor
    with torch.no_grad():
        head.lm_head.weight.copy_(ref.exits[str(split)].lm_head.weight if hasattr(ref.exits[str(split)], "lm_head")
                                  else ref.lm_head.weight)
    targets = {"token_embd.weight": (model.model.embed_tokens, 0), "output.weight": (head.lm_head, 0)}
    for i in range(split):
        for sub, kind in LINEAR_NAMES.items():
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(kind, 0)
            targets[f"blk.{i}.{kind}.weight"] = (model.model.layers[str(i)].get_submodule(sub), heads)
    norms = {f"blk.{i}.{n}.weight": getattr(model.model.layers[str(i)], m).weight for i in range(split)
             for n, m in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"))}
    norms["output_norm.weight"] = head.norm.weight
    for p in model.parameters():
        p.requires_grad_(False)
    reader = gguf.GGUFReader(str(path), "r+")
    tensors = {t.name: t for t in reader.tensors}
    tuned = {}
    for name, (mod, heads) in targets.items():
        t = tensors[name]
        if t.tensor_type in (T.F32, T.F16):
            continue
        a, b, levels = grid(t.data, t.tensor_type, int(t.shape[1]), int(t.shape[0]))
        if heads:
            a, b = unpermute_qk(a, heads), unpermute_qk(b, heads)
        on = OnGrid(mod.weight.detach(), np.ascontiguousarray(a), np.ascontiguousarray(b), levels,
                    scales and t.tensor_type in BLOCK_BYTES)
        parametrize.register_parametrization(mod, "weight", on, unsafe=True)
        tuned[name] = (on, heads, t)
    for w in norms.values():
        w.requires_grad_(True)
    opt = torch.optim.Adam([{"params": [on.delta for on, _, _ in tuned.values()], "lr": lr},
                            {"params": [on.logs for on, _, _ in tuned.values() if on.logs is not None] +
                             list(norms.values()), "lr": lr / 5}])
    rng, t0 = random.Random(seed), time.time()
    for step in range(steps):
        x = torch.tensor(rng.sample(calib, batch))
        with torch.no_grad():
            r = ref.stage(0, split)(x, exits=[split])
            want = r.exit_logits[split]
            want_final = ref.run_layers(r.hidden, None, None, split, n_layers).logits if system else None
        o = model.stage(0, split)(x, exits=[split])
        loss = _kl(o.exit_logits[split], want)
        if system:
            loss = loss + _kl(ref.run_layers(o.hidden, None, None, split, n_layers).logits, want_final)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step}: KL {loss.item():.5f} ({time.time() - t0:.0f} s)")
    for name, (on, heads, t) in tuned.items():
        q = on.codes().numpy()
        if on.logs is not None:
            d = on.step().detach()[:, ::32].numpy()
            set_scales(t.data, t.tensor_type, permute_qk(d, heads) if heads else d)
        encode(t.data, t.tensor_type, permute_qk(q, heads) if heads else q)
        a, b, levels = grid(t.data, t.tensor_type, int(t.shape[1]), int(t.shape[0]))
        want = a * levels.astype(np.float32)[permute_qk(q, heads) if heads else q] + b  # float32, as gguf-py
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if not np.array_equal(got, want):
            raise AssertionError(f"{name}: the rewritten blocks do not decode to the chosen grid values")
    for name, w in norms.items():
        tensors[name].data[:] = w.detach().numpy()
    reader.data.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--quant", default="q4-mix", help="an export_gguf quant or mix (default q4-mix)")
    ap.add_argument("--calib", required=True, help="calibration text (disjoint from --text)")
    ap.add_argument("--text", required=True, help="held-out evaluation text")
    ap.add_argument("--calib-tokens", type=int, default=65536)
    ap.add_argument("--text-tokens", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3, help="Adam step, in grid steps")
    ap.add_argument("--scales", action="store_true", help="train the f16 scale of each 32-weight block too")
    ap.add_argument("--system", action="store_true",
                    help="also match the final head computed by the fp32 deep layers on the edge's split rows")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from coexit.textdata import read_documents, spread_chunks
    from coexit.tokenizer import Tokenizer
    from edge.export.gguf import export_gguf, sidecar_path

    model_dir = Path(args.model)
    tok = Tokenizer.from_file(model_dir / "tokenizer.json")
    calib = [c for c in spread_chunks(tok, read_documents([args.calib]), args.calib_tokens, args.seq)
             if len(c) == args.seq]
    chunks = eval_chunks(model_dir, args.text, args.text_tokens, 256)
    ref = torch_top1(model_dir, chunks)
    with tempfile.TemporaryDirectory() as tmp:
        first = export_gguf(model_dir, args.quant, Path(tmp) / "edge.gguf", args.threads)
        path = Path(shutil.copy(first, Path(tmp) / "tuned.gguf"))
        if sidecar_path(first).exists():
            shutil.copy(sidecar_path(first), sidecar_path(path))
        before = float((llama_top1(first, chunks, args.threads) == ref).mean())
        tune(model_dir, path, calib, args.steps, args.lr, args.batch, scales=args.scales, system=args.system,
             log=lambda m: print(m, file=sys.stderr))
        after = float((llama_top1(path, chunks, args.threads) == ref).mean())
        emit = emit_agreement(model_dir, chunks, {"before": first, "after": path}, args.threads)
    learned = ("codes and scales" if args.scales else "codes") + (", system loss" if args.system else "")
    print(f"{args.quant}: split-exit top-1 vs torch fp32 over {ref.size} held-out tokens: llama.cpp's codes "
          f"{before:.2%}, learned {learned} ({args.steps} steps x {args.batch} x {args.seq} tokens of "
          f"{len(calib)} calibration sequences) {after:.2%}")
    print(f"emitted = fp32 (collaborative mode, calibrated policy; bench/quant_mix.py --phase emit): fp32 edge "
          f"{emit['torch fp32']['emit_agree']:.2%}, llama.cpp's codes {emit['before']['emit_agree']:.2%}, learned "
          f"{emit['after']['emit_agree']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
