"""The edge stage as GGUF segments, one per exit interval, so that an early exit in llama.cpp skips the layers above.

For exits e1 < e2 < ... < split, the edge [0, split) becomes the files `layers-00-02.gguf`, `layers-02-04.gguf`, ...
in one directory (`edge-QUANT.segments/` by default). Each is a stock llama.cpp GGUF, written by edge/export/gguf.py
`export_gguf(layers=...)` with the same quantization choices (mixes, imatrix) as a whole-edge file:
- its blocks are the model's layers [lo, hi), renumbered from blk.0;
- its output head is exit `hi`'s (norm + projection), so llama.cpp's logits are that exit's logits;
- all but the first are fed the previous segment's residual through `llama_batch.embd`, never token ids;
- each carries the model config, the fingerprint and `coexit.layers` = [lo, hi].
The llama.cpp backend (edge/backends/llamacpp.py) chains them: a token that exits at `hi` never runs the next
segment, and the KV it skipped there is caught up with the next token that goes deeper, as coexit.decoding does.
"""

from __future__ import annotations

from pathlib import Path

from coexit.checkpoint import read_config
from edge.export.gguf import export_gguf


def segment_bounds(exit_layers, split: int) -> list[tuple[int, int]]:
    """[(0, e1), (e1, e2), ..., (ek, split)] over the exits below the split."""
    cuts = sorted({int(e) for e in exit_layers if 0 < e < split} | {split})
    return list(zip([0, *cuts[:-1]], cuts))


def segment_name(lo: int, hi: int) -> str:
    return f"layers-{lo:02d}-{hi:02d}.gguf"


def segment_range(path: str | Path) -> tuple[int, int]:
    """(lo, hi) of a segment file's name (the inverse of segment_name)."""
    _, lo, hi = Path(path).stem.split("-")
    return int(lo), int(hi)


def segment_files(directory: str | Path) -> list[Path]:
    """The segment files of a directory written by export_segments, in layer order."""
    files = sorted(Path(directory).glob("layers-*-*.gguf"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no GGUF segments (layers-LO-HI.gguf); write them with "
                                f"`coexit export-edge --model DIR --layout segments`")
    return files


def export_segments(model_dir: str | Path, quant: str = "f16", out: str | Path | None = None,
                    threads: int = 2, **kw) -> Path:
    """Write the edge of a checkpoint directory as GGUF segments into `out`; returns the directory. quant and kw
    (imatrix, embd, output, keep_layers, keep_type) are export_gguf's, applied to every segment."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    out = Path(out) if out else model_dir / f"edge-{quant}.segments"
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("layers-*-*.gguf"):
        stale.unlink()
    for lo, hi in segment_bounds(cfg.exit_layers, cfg.split_layer):
        export_gguf(model_dir, quant, out / segment_name(lo, hi), threads, layers=(lo, hi), **kw)
    return out
