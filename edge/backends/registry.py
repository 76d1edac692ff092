"""`make_backend(kind, path, **kw)`: build any edge backend by name, importing its runtime only when asked.

Kinds:
- "torch": coexit's model in fp32 (kw: dtype, max_len); path is a checkpoint directory.
- "bnb-int8", "bnb-nf4": bitsandbytes edge blocks (kw: max_len); path is a checkpoint directory.
- "gguf": llama.cpp. path is an edge .gguf file (from `coexit export-edge`), or a checkpoint directory, which is
  exported on the fly (kw: quant, default "q8_0"; out, default DIR/edge-QUANT.gguf, reused when it exists and
  holds the checkpoint's fingerprint). Other kw go to LlamaCppBackend (n_threads, max_len, n_batch, kv_type,
  flash_attn).
"""

from __future__ import annotations

from pathlib import Path

from edge.backends.base import EdgeBackend

KINDS = ("torch", "bnb-int8", "bnb-nf4", "gguf")


def _gguf_path(path: Path, quant: str, out: str | Path | None) -> Path:
    if path.is_file():
        return path
    from coexit.checkpoint import fingerprint
    from edge.backends.gguf_heads import gguf_fingerprint
    from edge.export_gguf import export_gguf

    target = Path(out) if out else path / f"edge-{quant}.gguf"
    if target.exists() and gguf_fingerprint(target) == fingerprint(path):
        return target
    return export_gguf(path, quant, target)


def make_backend(kind: str, path: str | Path, **kw) -> EdgeBackend:
    path = Path(path)
    if kind == "torch":
        from edge.backends.torch_backend import TorchBackend

        return TorchBackend.from_checkpoint(path, **kw)
    if kind in ("bnb-int8", "bnb-nf4"):
        from edge.backends.bnb import BnbBackend

        return BnbBackend.from_checkpoint(path, kind.split("-")[1], **kw)
    if kind == "gguf":
        from edge.backends.llamacpp import LlamaCppBackend

        gguf = _gguf_path(path, kw.pop("quant", "q8_0"), kw.pop("out", None))
        return LlamaCppBackend(gguf, **kw)
    raise ValueError(f"unknown edge backend {kind!r}; choose one of {', '.join(KINDS)}")
