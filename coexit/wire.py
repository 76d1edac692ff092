"""Wire tensor codec: hidden-state rows (n, C) to bytes and back, in fp32, fp16, bf16 or int8 with a per-row
absmax scale. Torch, with numpy for the decode of fp32, fp16 and int8 payloads (a few numpy calls cost a third of
torch's on a one-row payload, and do not give up the GIL, which a server's engine thread is waiting for); the
protobuf conversion at the gRPC boundary calls these. Also the one name of the
metadata header that carries the edge's session key (what load balancers route a generation's streams on)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ENCODINGS = ("fp32", "fp16", "bf16", "int8")
SESSION_KEY_HEADER = "x-coexit-session"  # gRPC metadata: the same random key on every stream of one generation
_FLOAT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_NUMPY = {"fp32": np.float32, "fp16": np.float16}  # bf16 has no numpy dtype


def bytes_per_row(encoding: str, cols: int) -> int:
    """Payload bytes of one row: data plus, for int8, its fp32 scale."""
    if encoding == "int8":
        return cols + 4
    return cols * _FLOAT[encoding].itemsize


def encode(rows: Tensor, encoding: str) -> tuple[bytes, bytes]:
    """rows (n, C) -> (data, scales). scales is empty except for int8 (n fp32 values)."""
    rows = rows.detach().float().cpu().contiguous()
    if encoding == "int8":
        scale = rows.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (n,)
        q = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return q.numpy().tobytes(), scale.numpy().tobytes()
    if encoding not in _FLOAT:
        raise ValueError(f"unknown encoding {encoding!r}; use one of {ENCODINGS}")
    return rows.to(_FLOAT[encoding]).view(torch.uint8).numpy().tobytes(), b""


def decode(data: bytes, scales: bytes, rows: int, cols: int, encoding: str) -> Tensor:
    """Inverse of encode: returns fp32 rows (rows, cols). Raises ValueError on a size mismatch."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; use one of {ENCODINGS}")
    expect = rows * (cols if encoding == "int8" else cols * _FLOAT[encoding].itemsize)
    if len(data) != expect:
        raise ValueError(f"{encoding} payload for {rows}x{cols} rows must be {expect} bytes, got {len(data)}")
    if encoding == "int8":
        if len(scales) != 4 * rows:
            raise ValueError(f"int8 payload needs {rows} fp32 scales ({4 * rows} bytes), got {len(scales)} bytes")
        q = np.frombuffer(data, dtype=np.int8).reshape(rows, cols).astype(np.float32)
        return torch.from_numpy(q * np.frombuffer(scales, dtype=np.float32)[:, None])
    if encoding in _NUMPY:  # astype copies: a writable fp32 array the caller owns
        return torch.from_numpy(np.frombuffer(data, dtype=_NUMPY[encoding]).reshape(rows, cols).astype(np.float32))
    if not data:  # torch.frombuffer refuses an empty buffer
        return torch.empty(rows, cols)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return buf.view(_FLOAT[encoding]).view(rows, cols).float()
