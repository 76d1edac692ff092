"""LoRA adapters as GGUF files that stock llama.cpp applies at run time over a (quantized) edge GGUF.

From a PEFT-layout adapter directory (coexit.lora): `general.type` adapter, `adapter.type` lora,
`adapter.lora.alpha`, and per adapted linear `blk.N.<tensor>.weight.lora_a` (r, in) and `.lora_b` (out, r) in
float32, under the same names and block numbers as the edge file (a segment's blocks are renumbered from blk.0, so
each segment gets its own adapter file). For arch "llama" the rows of lora_b of attn_q and attn_k are permuted
like the base weights (llama.cpp's interleaved rotary layout): (P W) + s (P B) A = P (W + s B A). llama.cpp scales
by alpha / r, as PEFT does.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from coexit.config import Config
from coexit.lora import WEIGHTS_FILE, read_adapter
from edge.export.gguf import permute_qk

GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def export_lora_gguf(adapter_dir: str | Path, config: Config, out: str | Path,
                     layers: tuple[int, int] | None = None) -> Path:
    """Write the adapter's tensors for decoder layers [lo, hi) (default the whole edge [0, split)) to `out`."""
    cfg, weights = read_adapter(adapter_dir)
    return _write(cfg, weights, config, Path(out), layers or (0, config.split_layer), adapter_dir)


def _write(cfg, weights, config: Config, out: Path, layers: tuple[int, int], source) -> Path:
    lo, hi = layers
    llama_arch = config.model_type == "llama"
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    w = gguf.GGUFWriter(str(out), config.model_type)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(cfg.alpha))
    n = 0
    for (i, t), (a, b) in sorted(weights.items()):
        if not lo <= i < hi:
            continue
        b_np = b.float().numpy()
        if llama_arch and t in heads:
            b_np = permute_qk(b_np, heads[t])
        name = f"blk.{i - lo}.{GGUF_NAMES[t]}.weight"
        w.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a.float().numpy()))
        w.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b_np))
        n += 1
    if n == 0:
        raise ValueError(f"the adapter in {source} adapts no layer in [{lo}, {hi})")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def adapter_files(adapter: str | Path, config, ranges: list[tuple[int, int]]) -> list[Path | None]:
    """GGUF LoRA files of a PEFT adapter directory for the edge files' layer ranges, written into the adapter
    directory on first use (`lora-layers-LO-HI.gguf`) and reused while newer than its weights; None for a range
    the adapter does not touch."""
    adapter = Path(adapter)
    cfg, weights = read_adapter(adapter)  # once, for every range
    adapted = {i for i, _ in weights}
    out = []
    for lo, hi in ranges:
        if not adapted & set(range(lo, hi)):
            out.append(None)
            continue
        f = adapter / f"lora-layers-{lo:02d}-{hi:02d}.gguf"
        if not f.exists() or f.stat().st_mtime < (adapter / WEIGHTS_FILE).stat().st_mtime:
            _write(cfg, weights, config, f, (lo, hi), adapter)
        out.append(f)
    return out
