"""Writing the edge stage of a checkpoint (embeddings, layers [0, split), exit heads) as a GGUF file that stock
llama.cpp loads, optionally quantized by llama.cpp's own quantizer (the command line, `coexit export-edge`: cli.py).

File layout (arch "llama", or "qwen2" for Qwen2 checkpoints, whose qkv bias llama.cpp supports under that arch):
- `block_count` = split, tensors under llama.cpp's names (token_embd, blk.N.attn_q, ...). For arch "llama" the Q/K
  weights (and biases) are permuted from HF's rotate-half layout to llama.cpp's interleaved RoPE layout, exactly
  as convert_hf_to_gguf.py's LlamaModel.permute does; qwen2 uses NEOX RoPE in llama.cpp, so it needs none.
  Llama-3 RoPE scaling is written as the `rope_freqs` tensor (per-frequency divisors).
- The split exit is the GGUF's output head: `output_norm` = exits.{split}.norm, `output` = its projection. So
  llama.cpp's own logits are the split exit's logits.
- Earlier exits (e < split) run in Python on the captured residual: their RMSNorm weights are metadata arrays
  `coexit.exit_norm.{e}`; their projection is `output` itself when the checkpoint shares the LM head
  (`coexit.exit_head.{e}` = "output"), otherwise a tensor `exit.{e}.output.weight` in a sidecar GGUF next to the
  file (`<name>.exits.gguf`, `coexit.exit_head.{e}` = "sidecar"; Q8_0, or F16 for f16/f32 exports). Extra
  tensors cannot live in the main file: llama.cpp refuses files with tensors it does not expect.
- `coexit.config` (the full model's config.json), `coexit.fingerprint` (coexit.checkpoint.fingerprint of the
  source directory, so the backend presents the same fingerprint as the torch edge), `coexit.tokenizer_json`.

Quantization: an f32 GGUF is written with gguf-py, then `llama_model_quantize` (llama.cpp's quantizer, the one
llama-quantize uses) converts it; its rules apply (e.g. q4_k_m keeps some tensors at q6_K, and tensors whose
rows are not a multiple of the block size fall back to a compatible type). On top of a base type:
- per-tensor types: the token embedding and the output head (`token_embedding_type`, `output_tensor_type` of
  llama_model_quantize_params) and whole layers (`tt_overrides`, regex -> type), e.g. `--keep-layers 0`;
- an importance matrix (edge/export/imatrix.py, `coexit imatrix`): `MODEL/imatrix.gguf` is used by default for the
  4-bit types when it exists (`--imatrix none` to opt out); the file and its datasets are recorded in the
  GGUF's `quantize.imatrix.*` metadata, as llama-quantize records them;
- named mixes (MIXES): "q4-mix" = q4_k_m with token_embd, output and layer 0 at q8_0 (+ the imatrix when
  there is one). The mix (or the per-tensor choices) is recorded as `coexit.quant`.
"""

from __future__ import annotations

import ctypes
import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
import torch

from coexit.checkpoint import fingerprint, load, read_config
from coexit.config import Config
from coexit.model import EarlyExitLM, rope_inv_freq
from edge.export.imatrix import LINEAR_NAMES
from edge.export.vocab import add_vocab

QUANTS = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
          "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}
IMATRIX_FILE = "imatrix.gguf"  # in a checkpoint directory: used by default for 4-bit exports


@dataclass(frozen=True)
class QuantMix:
    """A base llama.cpp file type plus per-tensor types (ggml type names, e.g. "q8_0") and the imatrix."""

    base: str
    embd: str | None = None  # token_embd.weight
    output: str | None = None  # output.weight (the split exit's head)
    layers: tuple[int, ...] = ()  # edge layers kept whole at `layer_type`
    layer_type: str = "q8_0"
    imatrix: bool = True  # use the checkpoint's imatrix when there is one
    tensors: tuple[str, ...] = ()  # tensors of every edge layer kept at `layer_type`, e.g. ("attn_v", "ffn_down")

    def describe(self) -> str:
        parts = [self.base] + [f"{k}:{v}" for k, v in (("embd", self.embd), ("output", self.output)) if v]
        return "+".join(parts + [f"blk.{i}:{self.layer_type}" for i in self.layers] +
                        [f"blk.*.{t}:{self.layer_type}" for t in self.tensors])


# The best mix measured by bench/quant_mix.py (bench/results/quant_mix.txt): q4_k_m layers, but the token
# embedding, the output head and the first layer (the tensors whose rounding the split exit feels most) at q8_0.
# k-quants need rows a multiple of 256 wide: narrower matrices fall back to q5_0 (llama.cpp's rule), so at d 384
# this mix's layers average 6.2 bits per weight (bench/quant_mix.py's "layer bpw").
MIXES = {"q4-mix": QuantMix("q4_k_m", embd="q8_0", output="q8_0", layers=(0,))}
IMATRIX_QUANTS = ("q4_0", "q4_k_m")  # base types whose quantizers use an importance matrix


def ggml_type(name: str) -> int:
    try:
        return int(gguf.GGMLQuantizationType[name.upper()])
    except KeyError:
        raise ValueError(f"unknown ggml type {name!r} (e.g. f16, q8_0, q6_k, q4_k, q4_0)") from None


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name.removesuffix(".gguf") + ".exits.gguf")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved rows, per head (convert_hf_to_gguf LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of permute_qk: llama.cpp interleaved rows -> HF rotate-half rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def stage_tensors(model: EarlyExitLM, layers: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """llama.cpp tensor name -> fp32 array (torch orientation) for layers [lo, hi) (default: the edge stage
    [0, split)), renumbered from blk.0, with exit `hi`'s head as the output head. A segment that does not start
    at layer 0 still carries token_embd (llama.cpp requires it) but is fed embeddings, never token ids; when its
    head is the tied embedding itself, `output` is left out and llama.cpp uses token_embd (one copy, not two)."""
    cfg = model.config
    lo, hi = layers or (0, cfg.split_layer)
    llama_arch = cfg.model_type == "llama"
    out = {"token_embd.weight": _np(model.model.embed_tokens.weight)}
    for i in range(lo, hi):
        blk, p = model.model.layers[str(i)], f"blk.{i - lo}."
        att = blk.self_attn
        for ours, theirs, heads in ((att.q_proj, "attn_q", cfg.num_attention_heads),
                                    (att.k_proj, "attn_k", cfg.num_key_value_heads), (att.v_proj, "attn_v", 0)):
            for kind in ("weight", "bias"):
                t = getattr(ours, kind)
                if t is None:
                    continue
                a = _np(t)
                out[f"{p}{theirs}.{kind}"] = permute_qk(a, heads) if llama_arch and heads else a
        out[p + "attn_output.weight"] = _np(att.o_proj.weight)
        out[p + "attn_norm.weight"] = _np(blk.input_layernorm.weight)
        out[p + "ffn_norm.weight"] = _np(blk.post_attention_layernorm.weight)
        out[p + "ffn_gate.weight"] = _np(blk.mlp.gate_proj.weight)
        out[p + "ffn_up.weight"] = _np(blk.mlp.up_proj.weight)
        out[p + "ffn_down.weight"] = _np(blk.mlp.down_proj.weight)
    head = model.exits[str(hi)]
    out["output_norm.weight"] = _np(head.norm.weight)
    out["output.weight"] = _np(head.lm_head.weight if hasattr(head, "lm_head") else model.lm_head.weight)
    if layers is not None and np.array_equal(out["output.weight"], out["token_embd.weight"]):
        del out["output.weight"]
    if cfg.rope_scaling is not None:  # llama.cpp divides the base frequencies by these factors
        base = rope_inv_freq(cfg.replace(rope_scaling=None))
        out["rope_freqs.weight"] = _np(base / rope_inv_freq(cfg))
    return out


def _add_hparams(w: gguf.GGUFWriter, cfg: Config, n_layers: int | None = None) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.split_layer if n_layers is None else n_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)


def write_f32_gguf(model: EarlyExitLM, model_dir: Path, out: Path, f16: bool = False,
                   layers: tuple[int, int] | None = None, meta: dict[str, str] | None = None) -> None:
    """The unquantized edge GGUF (2-D weights in f16 when `f16`), plus the sidecar when exits need one. With
    `layers` = (lo, hi), one segment of the edge instead: layers [lo, hi) with exit `hi` as its output head
    (`coexit.layers` records the range; no Python-side exit heads, so no sidecar). `meta`: extra string keys
    (llama.cpp's quantizer copies them into the quantized file, at any length)."""
    cfg = model.config
    split = cfg.split_layer
    lo, hi = layers or (0, split)
    w = gguf.GGUFWriter(str(out), cfg.model_type)
    w.add_name(f"coexit edge stage [{lo}, {hi}) of {model_dir.name}")
    w.add_file_type(QUANTS["f16" if f16 else "f32"])
    _add_hparams(w, cfg, hi - lo)
    w.add_string("coexit.config", json.dumps(cfg.to_dict(), sort_keys=True))
    w.add_string("coexit.fingerprint", model.fingerprint)
    w.add_uint32("coexit.split_layer", split)
    w.add_array("coexit.exit_layers", [int(e) for e in cfg.exit_layers if e <= split])
    if layers is not None:
        w.add_array("coexit.layers", [lo, hi])
    for key, value in (meta or {}).items():
        w.add_string(key, value)
    sidecar: dict[str, np.ndarray] = {}
    for e in (e for e in cfg.exit_layers if e < split and layers is None):
        head = model.exits[str(e)]
        w.add_array(f"coexit.exit_norm.{e}", [float(x) for x in _np(head.norm.weight)])
        w.add_string(f"coexit.exit_head.{e}", "sidecar" if hasattr(head, "lm_head") else "output")
        if hasattr(head, "lm_head"):
            sidecar[f"exit.{e}.output.weight"] = _np(head.lm_head.weight)
    tok = model_dir / "tokenizer.json"
    if tok.is_file() and lo == 0:
        w.add_string("coexit.tokenizer_json", tok.read_text())
    add_vocab(w, tok, cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id)
    for name, a in stage_tensors(model, layers).items():
        w.add_tensor(name, a.astype(np.float16) if f16 and a.ndim == 2 else a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if sidecar:
        write_sidecar(sidecar, sidecar_path(out), "f16" if f16 else "f32")


def write_sidecar(heads: dict[str, np.ndarray], path: Path, quant: str) -> None:
    """Exit projections that llama.cpp does not run: Q8_0 for quantized exports (F16 if rows don't fit)."""
    w = gguf.GGUFWriter(str(path), "coexit-exits")
    for name, a in heads.items():
        if quant in ("f16", "f32") or a.shape[-1] % 32:
            w.add_tensor(name, a.astype(np.float16 if quant != "f32" else np.float32))
        else:
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(a.astype(np.float32), q8), raw_dtype=q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_gguf(src: Path, dst: Path, quant: str, threads: int = 2, *, embd: str | None = None,
                  output: str | None = None, tensor_types: dict[str, str] | None = None,
                  imatrix: dict[str, np.ndarray] | None = None, metadata: dict[str, str] | None = None) -> None:
    """Run llama.cpp's quantizer (llama_model_quantize) from an f32 GGUF to `quant` (a QUANTS key), with
    token_embd / output at `embd` / `output`, tensors matching a `tensor_types` regex at its type, an importance
    matrix (GGUF tensor name -> per-column weights) and extra string metadata."""
    from edge.llamacpp.lib import llama

    lc = llama()
    params = lc.llama_model_quantize_default_params()
    params.ftype = int(QUANTS[quant])
    params.nthread = threads
    if embd:
        params.token_embedding_type = ggml_type(embd)
    if output:
        params.output_tensor_type = ggml_type(output)
    keep = []  # the C arrays and what they point to must outlive the call
    if tensor_types:
        tt = (lc.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, t) in enumerate(tensor_types.items()):
            keep.append(pattern.encode())
            tt[i].pattern, tt[i].type = keep[-1], ggml_type(t)
        params.tt_overrides = tt
    if imatrix:
        im = (lc.llama_model_imatrix_data * (len(imatrix) + 1))()  # ends with a null name
        for i, (name, v) in enumerate(sorted(imatrix.items())):
            v = np.ascontiguousarray(v, dtype=np.float32)
            keep += [name.encode(), v]
            im[i].name, im[i].size = keep[-2], v.size
            im[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = im
    if metadata:
        kv = (lc.llama_model_kv_override * (len(metadata) + 1))()  # ends with an empty key
        for i, (key, value) in enumerate(metadata.items()):
            kv[i].tag, kv[i].key = lc.LLAMA_KV_OVERRIDE_TYPE_STR, key.encode()
            kv[i].value.val_str = value.encode()[:127]
        params.kv_overrides = kv
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {quant}) failed with code {rc}; set the "
                           f"'edge.llamacpp' logger to DEBUG to see llama.cpp's message")


def resolve_imatrix(model_dir: Path, imatrix: str | Path | bool | None) -> Path | None:
    """None/True: MODEL/imatrix.gguf when it exists (True: it must); False or "none": no imatrix; else a path."""
    if imatrix is False or (isinstance(imatrix, str) and imatrix.lower() == "none"):
        return None
    if imatrix is None or imatrix is True:
        path = model_dir / IMATRIX_FILE
        if imatrix is True and not path.is_file():
            raise ValueError(f"no {IMATRIX_FILE} in {model_dir}; make one with `coexit imatrix`")
        return path if path.is_file() else None
    path = Path(imatrix)
    if not path.is_file():
        raise ValueError(f"imatrix file {path} does not exist")
    return path


def export_gguf(model_dir: str | Path, quant: str = "f16", out: str | Path | None = None,
                threads: int = 2, *, imatrix: str | Path | bool | None = None, embd: str | None = None,
                output: str | None = None, keep_layers: tuple[int, ...] | None = None,
                keep_type: str | None = None, keep_tensors: tuple[str, ...] | None = None,
                layers: tuple[int, int] | None = None, policy=None, meta: dict[str, str] | None = None,
                weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Export layers [0, split) and the edge exits of a checkpoint directory as a GGUF; returns its path.
    layers=(lo, hi): one segment instead (edge/export/segments.py), its blocks renumbered from blk.0; the mix's
    kept layers and the imatrix entries follow the renumbering.

    quant: a QUANTS key or a MIXES name; embd / output / keep_layers / keep_tensors (+ keep_type) override the
    mix's per-tensor types. imatrix: see resolve_imatrix (used for the 4-bit base types only; a mix can opt out).

    policy: an edge/export/policy.py Policy (or its JSON file) instead of `quant`: every edge matrix at the
    policy's type, token_embd/output at its head types, the imatrix it was measured with, and the policy itself
    in the metadata (`coexit.quant_policy`, JSON; `coexit.quant` = its description). meta: extra string keys.
    weights: tuned tensors (torch parameter names, e.g. from edge/export/qat.py) written instead of the
    checkpoint's; the file keeps the checkpoint's fingerprint."""
    if policy is not None:
        return _export_policy(Path(model_dir), policy, out, threads, layers, meta, weights)
    if quant not in QUANTS and quant not in MIXES:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {sorted(QUANTS) + sorted(MIXES)}")
    mix = MIXES.get(quant, QuantMix(quant))
    mix = replace(mix, embd=embd or mix.embd, output=output or mix.output,
                  layers=mix.layers if keep_layers is None else tuple(keep_layers),
                  tensors=mix.tensors if keep_tensors is None else tuple(keep_tensors),
                  layer_type=keep_type or mix.layer_type)
    model_dir = Path(model_dir)
    model = _load_edge(model_dir, weights)
    out = Path(out) if out else model_dir / f"edge-{quant}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = dict(meta or {})
    if mix.base in ("f32", "f16"):
        write_f32_gguf(model, model_dir, out, f16=mix.base == "f16", layers=layers, meta=extra)
        return out
    lo, hi = layers or (0, model.config.split_layer)
    im_path = resolve_imatrix(model_dir, imatrix if mix.imatrix or imatrix not in (None, True) else False)
    if mix.base not in IMATRIX_QUANTS:
        im_path = None
    meta, im_values = {}, None
    if quant in MIXES or mix != QuantMix(quant):
        meta["coexit.quant"] = quant if mix == MIXES.get(quant) else mix.describe()
    if im_path is not None:
        from edge.export.imatrix import Imatrix

        im = Imatrix.load(im_path)
        if im.fingerprint and im.fingerprint != model.fingerprint:
            raise ValueError(f"{im_path} was computed for another checkpoint (fingerprint {im.fingerprint[:12]}, "
                             f"this one {model.fingerprint[:12]}); recompute it with `coexit imatrix`")
        im_values = _renumber(im.values(), lo, hi, keep_output=hi == model.config.split_layer)
        meta.update({"quantize.imatrix.file": im_path.name, "quantize.imatrix.dataset": ",".join(im.datasets),
                     "quantize.imatrix.entries_count": str(len(im_values)),
                     "quantize.imatrix.chunks_count": str(im.chunk_count)})
    layer_types = {rf"^blk\.{i - lo}\.": mix.layer_type for i in mix.layers if lo <= i < hi}
    layer_types.update({rf"^blk\.\d+\.{t}\.": mix.layer_type for t in mix.tensors})
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "edge-f32.gguf"
        write_f32_gguf(model, model_dir, src, layers=layers, meta=extra)
        quantize_gguf(src, out, mix.base, threads, embd=mix.embd, output=mix.output, tensor_types=layer_types,
                      imatrix=im_values, metadata=meta)
        if sidecar_path(src).exists():
            heads = {}
            reader = gguf.GGUFReader(str(sidecar_path(src)))
            for t in reader.tensors:
                heads[t.name] = np.array(t.data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
            del reader
            write_sidecar(heads, sidecar_path(out), mix.base)
    return out


def _export_policy(model_dir: Path, policy, out: str | Path | None, threads: int,
                   layers: tuple[int, int] | None, extra: dict[str, str] | None = None,
                   weights: dict[str, torch.Tensor] | None = None) -> Path:
    from edge.export.imatrix import Imatrix
    from edge.export.policy import META_KEY, Policy

    policy = policy if isinstance(policy, Policy) else Policy.load(policy)
    if policy.backend != "gguf":
        raise ValueError(f"this policy is for the {policy.backend} backend, not a GGUF; choose one for llama.cpp "
                         f"with `coexit compress --backend gguf`")
    model = _load_edge(model_dir, weights)
    if policy.fingerprint != model.fingerprint:
        raise ValueError(f"the policy was chosen for another checkpoint (fingerprint {policy.fingerprint[:12]}, "
                         f"this one {model.fingerprint[:12]}); run `coexit compress --model {model_dir}` again")
    split = model.config.split_layer
    lo, hi = layers or (0, split)
    missing = sorted({f"blk.{i}.{t}.weight" for i in range(split) for t in LINEAR_NAMES.values()} - set(policy.types))
    if missing:
        raise ValueError(f"the policy has no type for {', '.join(missing)}")
    out = Path(out) if out else model_dir / f"edge-policy-{policy.budget_bpw:g}bpw.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    im_values = None
    meta = {"coexit.quant": policy.describe(), META_KEY: policy.to_json(), **(extra or {})}
    if policy.imatrix:
        im_path = resolve_imatrix(model_dir, model_dir / policy.imatrix)
        im = Imatrix.load(im_path)
        im_values = _renumber(im.values(), lo, hi, keep_output=hi == split)
        meta.update({"quantize.imatrix.file": im_path.name, "quantize.imatrix.dataset": ",".join(im.datasets),
                     "quantize.imatrix.entries_count": str(len(im_values)),
                     "quantize.imatrix.chunks_count": str(im.chunk_count)})
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "edge-f32.gguf"
        write_f32_gguf(model, model_dir, src, layers=layers, meta=meta)
        # the base file type only names the file: every edge matrix and both heads are overridden
        quantize_gguf(src, out, "q8_0", threads, embd=policy.heads["token_embd.weight"],
                      output=policy.heads["output.weight"], tensor_types=policy.tensor_types(lo, hi),
                      imatrix=im_values)
        if sidecar_path(src).exists():
            reader = gguf.GGUFReader(str(sidecar_path(src)))
            heads = {t.name: np.array(t.data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
                     for t in reader.tensors}
            del reader
            write_sidecar(heads, sidecar_path(out), "q8_0")
    return out


def _renumber(values: dict[str, np.ndarray], lo: int, hi: int, keep_output: bool) -> dict[str, np.ndarray]:
    """imatrix entries of the edge's tensors -> those of the segment [lo, hi) (blk.i -> blk.{i - lo}); the
    `output` entry belongs to the split exit's head, so only the segment ending at the split keeps it."""
    out = {}
    for name, v in values.items():
        if name.startswith("blk."):
            i, rest = name[4:].split(".", 1)
            if lo <= int(i) < hi:
                out[f"blk.{int(i) - lo}.{rest}"] = v
        elif name != "output.weight" or keep_output:
            out[name] = v
    return out


def _load_edge(model_dir: Path, weights: dict[str, torch.Tensor] | None = None) -> EarlyExitLM:
    split = read_config(model_dir).split_layer
    model = load(model_dir, layers=(0, split), dtype=torch.float32)
    model.fingerprint = model.fingerprint or fingerprint(model_dir)
    if weights:
        apply_weights(model, weights)
    return model


def apply_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Copy tuned tensors (torch parameter names) into `model` in place; every name must be one of its own."""
    own = dict(model.named_parameters())
    missing = sorted(set(weights) - set(own))
    if missing:
        raise KeyError(f"tuned tensors not in the model: {', '.join(missing[:5])}")
    with torch.no_grad():
        for n, w in weights.items():
            own[n].copy_(w)
