"""Reading an edge GGUF written by `coexit export-edge` (edge/export/gguf.py) from Python: the model config, the
fingerprint, the tokenizer, and the exit heads that run in Python on captured hidden states.

An exit head is RMSNorm (its own weight, from `coexit.exit_norm.{e}`) followed by a projection: the GGUF's
`output` tensor when the checkpoint shares the LM head, or `exit.{e}.output.weight` from the sidecar GGUF. The
projection is dequantized once with gguf-py to an fp32 (V, C) matrix (so its quantization error is the same as
the stored tensor's, and heads sharing `output` share one copy); logits are computed in fp32 with torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import Tensor

from coexit.config import Config


def _field(reader: gguf.GGUFReader, key: str):
    f = reader.get_field(key)
    if f is None:
        return None
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.parts[i].tolist()[0] for i in f.data]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v.tolist()[0]


def _dequantized(reader: gguf.GGUFReader, name: str) -> Tensor:
    for t in reader.tensors:
        if t.name == name:
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # ggml ne -> torch (rows, cols)
            a = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            return torch.from_numpy(np.array(a, dtype=np.float32).reshape(shape))
    raise KeyError(f"{name} not found in {reader.path}")


@dataclass
class ExitHead:
    norm: Tensor  # (C,)
    proj: Tensor  # (V, C) fp32
    eps: float

    def __call__(self, hidden: Tensor) -> Tensor:
        """hidden (C,) or (n, C) fp32 residual after e layers -> logits (.., V)."""
        x = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.norm * x) @ self.proj.T


@dataclass
class EdgeGGUF:
    path: Path
    config: Config
    fingerprint: str
    quant: int  # general.file_type
    tokenizer_json: str | None
    heads: dict[int, ExitHead] = field(default_factory=dict)  # exits before the split (whole-edge files)
    layers: tuple[int, int] | None = None  # a segment's layer range (edge/export/segments.py); None: [0, split)


def gguf_field(path: str | Path, key: str):
    """One metadata value of a GGUF (None when absent), without loading its tensors."""
    return _field(gguf.GGUFReader(str(path)), key)


def gguf_fingerprint(path: str | Path) -> str | None:
    """The `coexit.fingerprint` of a GGUF (None when it has none), without loading its tensors."""
    return _field(gguf.GGUFReader(str(path)), "coexit.fingerprint")


def read_edge_gguf(path: str | Path) -> EdgeGGUF:
    from edge.export.gguf import sidecar_path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    reader = gguf.GGUFReader(str(path))
    cfg_json = _field(reader, "coexit.config")
    if cfg_json is None:
        raise ValueError(f"{path} is not a coexit edge GGUF (no coexit.config metadata); write one with "
                         f"`coexit export-edge --model DIR --format gguf`")
    config = Config.from_dict(json.loads(cfg_json))
    meta = EdgeGGUF(path, config, _field(reader, "coexit.fingerprint") or "",
                    int(_field(reader, "general.file_type") or 0), _field(reader, "coexit.tokenizer_json"))
    layers = _field(reader, "coexit.layers")
    if layers is not None:  # a segment: its one exit is llama.cpp's own output head
        meta.layers = (int(layers[0]), int(layers[1]))
        return meta
    shared: Tensor | None = None
    side = None
    for e in (e for e in config.exit_layers if e < config.split_layer):
        norm = torch.tensor(_field(reader, f"coexit.exit_norm.{e}"), dtype=torch.float32)
        if _field(reader, f"coexit.exit_head.{e}") == "output":
            shared = _dequantized(reader, "output.weight") if shared is None else shared
            proj = shared
        else:
            side = side or gguf.GGUFReader(str(sidecar_path(path)))
            proj = _dequantized(side, f"exit.{e}.output.weight")
        meta.heads[e] = ExitHead(norm, proj, config.rms_norm_eps)
    return meta
