"""Learned rounding on llama.cpp's own grid, as an export step (`coexit export-edge --learned-rounding STEPS`).

For every quantized matrix of an exported edge GGUF, the block scales and mins that llama.cpp's quantizer chose
are kept and only the integer codes are chosen anew: latent weights w = w_fp32 + a * delta (a: the element's grid
step), used at their nearest grid value (straight-through gradient), trained with Adam to minimise the split exit's
KL to fp32 plus the final head's KL when the fp32 deep layers run on the quantized split rows (what the cloud
answers from), on calibration text; the file's f32 RMSNorm weights train too. The codes are written back into the
blocks in place and every rewritten tensor is checked against gguf-py's dequantizer.

Types: Q8_0, Q4_0, IQ4_NL, Q5_0, Q5_1, Q4_K, Q6_K are rewritten; others (Q5_K, F16) keep llama.cpp's codes.
Segments: the whole edge file is tuned once, then each segment's tensors (the same bytes, renumbered) take the
tuned blocks and norms (`transplant`). With a tied head (the default model) a segment has no `output` tensor (its
head is its token_embd), so there the split exit uses the tuned token_embd rather than the tuned output head.
The method and its measured gain: bench/quant_rounding.py, bench/results/quant_mix.txt.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

T = gguf.GGMLQuantizationType
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
BLOCK_BYTES = {T.Q8_0: 34, T.Q4_0: 18, T.IQ4_NL: 18, T.Q5_0: 22}  # one f16 scale d first, per 32 weights
TUNABLE = (T.Q8_0, T.Q4_0, T.IQ4_NL, T.Q5_0, T.Q5_1, T.Q4_K, T.Q6_K)


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
    if qtype == T.Q5_1:
        blk = data.reshape(-1, 24)
        return per(_f16(blk, 0), 32), per(_f16(blk, 2), 32), ar(0, 32)
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


def _five_bit(blk: np.ndarray, q: np.ndarray, at: int) -> None:  # qh (4 bytes) at `at`, then 16 nibble bytes
    qq = q.reshape(-1, 32).astype(np.uint32)
    blk[:, at + 4:] = _nibbles(qq & 15)
    high = ((qq >> 4) << np.arange(32, dtype=np.uint32)).sum(1, dtype=np.uint32)
    blk[:, at:at + 4] = high.view(np.uint8).reshape(-1, 4)


def encode(data: np.ndarray, qtype: int, q: np.ndarray) -> None:
    """Write level indices q (rows, cols) into the tensor's blocks in place; the scale bytes stay."""
    if qtype == T.Q8_0:
        data.reshape(-1, 34)[:, 2:] = (q.reshape(-1, 32) - 128).astype(np.int8).view(np.uint8)
    elif qtype in (T.Q4_0, T.IQ4_NL):
        data.reshape(-1, 18)[:, 2:] = _nibbles(q)
    elif qtype == T.Q5_0:
        _five_bit(data.reshape(-1, 22), q, 2)
    elif qtype == T.Q5_1:
        _five_bit(data.reshape(-1, 24), q, 4)
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


class StepProgress:
    """A tuning loop's feedback (learned rounding, edge/export/qat.py): after its first step, the estimated time of
    all `steps` (logged), then, when asked, a progress bar showing the loss."""

    def __init__(self, what: str, steps: int, log, bar: bool) -> None:
        self.what, self.steps, self.log, self.want_bar = what, steps, log, bar
        self.t0, self.bar = time.time(), None

    def step(self, step: int, detail: str, loss_name: str, loss: torch.Tensor) -> None:
        """After `step`; detail names the work ("N tensors, S steps of B x T tokens")."""
        if step == 0 and self.steps > 1:
            self.log(f"{self.what}: {detail}: about {(time.time() - self.t0) * self.steps / 60:.1f} min on this "
                     f"machine")
            if self.want_bar:
                from tqdm import tqdm

                self.bar = tqdm(total=self.steps, initial=1, desc=self.what, unit="step")
        elif self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({loss_name: f"{loss.item():.5f}"})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def calibration(model_dir: str | Path, text: list[str], tokens: int = 65536, seq: int = 256) -> list[list[int]]:
    """Sequences of exactly `seq` tokens spread over the calibration text."""
    from coexit.textdata import read_documents, spread_chunks
    from coexit.tokenizer import Tokenizer

    tok = Tokenizer.from_file(Path(model_dir) / "tokenizer.json")
    seqs = [c for c in spread_chunks(tok, read_documents([str(t) for t in text]), tokens, seq) if len(c) == seq]
    if not seqs:
        raise ValueError(f"no calibration sequences of {seq} tokens in {text}")
    return seqs


def tune(model_dir: Path, path: Path, calib: list[list[int]], steps: int, lr: float = 2e-3, batch: int = 4,
         seed: int = 0, scales: bool = False, system: bool = True, log=print, progress: bool = False,
         weights: dict[str, torch.Tensor] | None = None) -> dict:
    """Re-choose the codes (and the norm weights) of the whole-edge GGUF at `path`, in place. The loss is the split
    exit's KL to fp32; with `system`, plus the final head's KL when the fp32 deep layers run on the quantized
    edge's split rows. `weights`: the tuned tensors the file was exported from (edge/export/qat.py), the start of
    the latent weights and norms. Returns {"tuned": [tensor names], "kept": [names whose type has no grid here],
    "seconds"}."""
    from coexit.checkpoint import load, read_config
    from edge.export.gguf import permute_qk, unpermute_qk
    from edge.export.imatrix import LINEAR_NAMES

    model_dir, path = Path(model_dir), Path(path)
    cfg = read_config(model_dir)
    split = cfg.split_layer
    ref = load(model_dir, layers=None if system else (0, split), dtype=torch.float32)
    model = load(model_dir, layers=(0, split), dtype=torch.float32)
    if weights:
        from edge.export.gguf import apply_weights

        apply_weights(model, weights)
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
    tuned, kept = {}, []
    for name, (mod, heads) in targets.items():
        t = tensors.get(name)
        if t is None or t.tensor_type in (T.F32, T.F16):
            continue
        if t.tensor_type not in TUNABLE:
            kept.append(name)
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
    shown = StepProgress("learned rounding", steps, log, progress)
    for step in range(steps):
        x = torch.tensor(rng.sample(calib, min(batch, len(calib))))
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
        shown.step(step, f"{len(tuned)} tensors, {steps} steps of {x.shape[0]} x {x.shape[1]} tokens", "kl", loss)
    shown.close()
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
    del reader
    return {"tuned": sorted(tuned), "kept": kept, "seconds": round(time.time() - t0, 1)}


def transplant(whole: Path, segment: Path, lo: int, hi: int, split: int, before: Path) -> int:
    """Copy the tuned blocks and norms of the whole-edge file into segment [lo, hi) in place (blk.i -> blk.i-lo;
    the split exit's output/output_norm only into the segment ending at the split). `before`: the whole file as
    exported, untuned: a segment tensor must equal it byte for byte before it is replaced. Returns tensors copied."""
    src = {t.name: t for t in gguf.GGUFReader(str(whole)).tensors}
    old = {t.name: t for t in gguf.GGUFReader(str(before)).tensors}
    reader = gguf.GGUFReader(str(segment), "r+")
    n = 0
    for t in reader.tensors:
        if t.name.startswith("blk."):
            i, rest = t.name[4:].split(".", 1)
            name = f"blk.{int(i) + lo}.{rest}"
        elif t.name in ("output.weight", "output_norm.weight") and hi != split:
            continue  # an earlier exit's head: not the tuned split head
        else:
            name = t.name
        if name not in src:
            continue
        if t.tensor_type != src[name].tensor_type or not np.array_equal(np.asarray(t.data), np.asarray(old[name].data)):
            raise AssertionError(f"{segment.name}: {t.name} differs from the whole file's {name} before tuning")
        t.data[...] = src[name].data
        n += 1
    reader.data.flush()
    del reader
    return n


def export_rounded(model_dir: str | Path, quant: str, out: str | Path | None, threads: int, *, steps: int,
                   text: list[str], tokens: int = 65536, layout: str = "whole", log=print, **kw) -> Path:
    """export_gguf (layout "whole") or export_segments ("segments") with `quant`/kw, then learned rounding for
    `steps` steps on `tokens` tokens of calibration `text`; the GGUF metadata records it (coexit.learned_rounding).
    Segments: the whole edge is exported and tuned in a temporary directory, and each segment takes its blocks."""
    import shutil
    import tempfile

    from coexit.checkpoint import read_config
    from edge.export.gguf import export_gguf
    from edge.export.segments import export_segments, segment_files, segment_range

    model_dir = Path(model_dir)
    calib = calibration(model_dir, text, tokens)
    meta = {"coexit.learned_rounding": f"{steps} steps x 4 x 256 tokens of {len(calib)} sequences of "
                                       f"{', '.join(str(t) for t in text)}; codes on llama.cpp's grid, split-exit "
                                       f"and final-head KL to fp32"}
    meta.update(kw.pop("meta", None) or {})
    weights = kw.get("weights")
    if layout == "whole":
        path = export_gguf(model_dir, quant, out, threads, meta=meta, **kw)
        info = tune(model_dir, path, calib, steps, log=log, progress=True, weights=weights)
    else:
        split = read_config(model_dir).split_layer
        seg_dir = export_segments(model_dir, quant, out, threads, meta=meta, **kw)
        with tempfile.TemporaryDirectory(dir=seg_dir) as tmp:
            whole = export_gguf(model_dir, quant, Path(tmp) / "edge.gguf", threads, meta=meta, **kw)
            before = Path(shutil.copy(whole, Path(tmp) / "before.gguf"))
            info = tune(model_dir, whole, calib, steps, log=log, progress=True, weights=weights)
            for f in segment_files(seg_dir):
                lo, hi = segment_range(f)
                transplant(whole, f, lo, hi, split, before)
        path = seg_dir
    if info["kept"]:
        log(f"learned rounding kept llama.cpp's codes for {', '.join(info['kept'])} (no grid for their type here)")
    log(f"learned rounding: {len(info['tuned'])} tensors in {info['seconds']:.0f} s")
    return path
