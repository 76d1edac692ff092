"""Wire tensor codec: hidden-state rows (n, C) to bytes and back, in fp32, fp16, bf16 or int8 with a per-row
absmax scale. Torch-only; the protobuf conversion at the gRPC boundary calls these. Also the one name of the
metadata header that carries the edge's session key (what load balancers route a generation's streams on)."""

from __future__ import annotations

import torch
from torch import Tensor

ENCODINGS = ("fp32", "fp16", "bf16", "int8")
SESSION_KEY_HEADER = "x-coexit-session"  # gRPC metadata: the same random key on every stream of one generation
_FLOAT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
        q = torch.frombuffer(bytearray(data), dtype=torch.int8).view(rows, cols).float()
        s = torch.frombuffer(bytearray(scales), dtype=torch.float32)
        return q * s[:, None]
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return buf.view(_FLOAT[encoding]).view(rows, cols).float()
