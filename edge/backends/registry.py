"""`make_backend(kind, path, **kw)`: build any edge backend by name, importing its runtime only when asked.

Kinds:
- "torch": coexit's model in fp32 (kw: dtype, max_len); path is a checkpoint directory.
- "bnb-int8", "bnb-nf4": bitsandbytes edge blocks (kw: max_len; policy: a `coexit compress --backend bnb` policy
  or its file, which sets each matrix's type); path is a checkpoint directory.
- "gguf": llama.cpp. path is an edge .gguf file or a directory of GGUF segments (from `coexit export-edge`), or a
  checkpoint directory, which is exported on the fly (kw: quant, default "q8_0"; layout, "segments" (default:
  exits skip the layers above them) or "whole" (one file); EdgeClient.from_checkpoint picks it with gguf_layout;
  out, default DIR/edge-QUANT.segments or DIR/edge-QUANT.gguf, reused when it exists and holds the checkpoint's
  fingerprint; quant may also be a compression policy file from `coexit compress`, exported as
  DIR/edge-policy-Bbpw.*, reused while it holds that policy). Other kw go to LlamaCppBackend (n_threads,
  max_len, n_batch, kv_type, flash_attn).
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge.backends.base import EdgeBackend

log = logging.getLogger("edge.backends")
KINDS = ("torch", "bnb-int8", "bnb-nf4", "gguf")


LAYOUTS = ("segments", "whole")


def gguf_layout(policy, mode: str, model_dir: str | Path) -> str:
    """The GGUF layout that serves `policy` in `mode` fastest: segments when the run can stop at, or looks at, an
    exit below the split (llama.cpp computes that exit's head, and a stop skips the layers above); otherwise one
    whole file, so a token costs one llama_decode rather than one per segment. Standalone mode emits at the split
    whatever a decision there says, so only the exits below it count (coexit.exits.Below)."""
    from coexit.checkpoint import read_config
    from coexit.exits import Below

    if not (Path(model_dir) / "config.json").exists():
        return "segments"  # an exported file or directory: its layout is already chosen
    if policy is None:
        return "whole"  # no exit can stop a row
    cfg = read_config(model_dir)
    view = Below(policy, cfg.split_layer) if mode == "standalone" else policy
    inner = [e for e in cfg.exit_layers if e < cfg.split_layer]
    return "segments" if any(e in view.may_stop() or view.checks(e) for e in inner) else "whole"


def _gguf_path(path: Path, quant: str, layout: str, out: str | Path | None) -> Path:
    if path.is_file() or (path.is_dir() and not (path / "config.json").exists()):
        return path  # an exported file or segment directory
    from coexit.checkpoint import fingerprint
    from coexit.errors import UsageError
    from edge.backends.gguf_heads import gguf_field, gguf_fingerprint
    from edge.export.gguf import MIXES, QUANTS, export_gguf
    from edge.export.segments import export_segments, segment_files

    if layout not in LAYOUTS:
        raise UsageError(f"unknown GGUF layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    policy = None
    if str(quant).endswith(".json"):  # a compression policy (edge/export/policy.py)
        from edge.export.policy import Policy

        try:
            policy = Policy.load(quant)
        except (OSError, ValueError, TypeError) as exc:
            raise UsageError(f"cannot read the compression policy {quant}: {exc}") from None
        quant = f"policy-{policy.budget_bpw:g}bpw"
    elif quant not in QUANTS and quant not in MIXES:  # before anything is written into the model directory
        raise UsageError(f"unknown quantization {quant!r}; choose one of {', '.join(sorted(QUANTS) + sorted(MIXES))} "
                         f"or a policy file from `coexit compress`")

    def current(f: Path) -> bool:
        if gguf_fingerprint(f) != fingerprint(path):
            return False
        return policy is None or gguf_field(f, "coexit.quant_policy") == policy.to_json()

    if layout == "segments":
        target = Path(out) if out else path / f"edge-{quant}.segments"
        files = segment_files(target) if target.is_dir() and any(target.glob("layers-*.gguf")) else []
        if files and all(current(f) for f in files):
            return target
        log.warning("exporting the edge layers as %s GGUF segments into %s (first use; reused afterwards)", quant,
                    target)
        return export_segments(path, quant, target, policy=policy)
    target = Path(out) if out else path / f"edge-{quant}.gguf"
    if target.exists() and current(target):
        return target
    log.warning("exporting the edge layers as a %s GGUF into %s (first use; reused afterwards)", quant, target)
    return export_gguf(path, quant, target, policy=policy)


def make_backend(kind: str, path: str | Path, **kw) -> EdgeBackend:
    from coexit.errors import UsageError

    path = Path(path)
    if kind == "torch":
        from edge.backends.torch_backend import TorchBackend

        return TorchBackend.from_checkpoint(path, **kw)
    if kind in ("bnb-int8", "bnb-nf4"):
        from edge.backends.bnb import BnbBackend

        return BnbBackend.from_checkpoint(path, kind.split("-")[1], **kw)
    if kind == "gguf":
        from edge.backends.llamacpp import LlamaCppBackend

        gguf = _gguf_path(path, kw.pop("quant", "q8_0"), kw.pop("layout", None) or "segments", kw.pop("out", None))
        return LlamaCppBackend(gguf, **kw)
    raise UsageError(f"unknown edge backend {kind!r}; choose one of {', '.join(KINDS)}")
