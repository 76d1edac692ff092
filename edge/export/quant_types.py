"""llama.cpp's tensor types as a compression policy sees them: the candidates, the type a tensor is *stored* as
(llama.cpp's fallback for rows that do not fit a type's blocks), its size in bytes, and a single tensor quantized
and dequantized exactly as llama.cpp's quantizer writes it.

- Quantize: `ggml_quantize_chunk` from llama-cpp-python's libggml-base (the function `llama_model_quantize` calls
  per tensor, with the importance matrix's per-column weights), so the bytes are the exported file's own;
  dequantize: gguf-py's numpy reference (`gguf.quants.dequantize`). A torch weight (out, in) is quantized row by row
  along `in`, as the GGUF stores it; llama.cpp's Q/K row permutation reorders whole rows, so it commutes.
- Fallback (llama-quant.cpp): k-quants need rows a multiple of 256 wide; a narrower tensor is stored as q4_k -> q5_0,
  q5_k -> q5_1, q6_k -> q8_0. A policy names stored types only, so the file holds exactly the policy's types.
- The bitsandbytes backend's types (BNB, edge/backends/bnb.py), by size only: "bnb-nf4" (Linear4bit: packed 4-bit
  codes plus an fp32 absmax per 64 weights, 4.5 bits) and "bnb-int8" (Linear8bitLt: int8 plus an fp32 scale per
  row). Their rounding is bitsandbytes' own modules, measured by the backend room.
"""

from __future__ import annotations

import ctypes
from functools import cache

import gguf
import numpy as np

CANDIDATES = ("q4_0", "iq4_nl", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0", "f16")
BNB = ("bnb-nf4", "bnb-int8")
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}  # when the row width is not a multiple of 256
QK_K = 256


def qtype(name: str) -> gguf.GGMLQuantizationType:
    try:
        return gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        raise ValueError(f"unknown ggml type {name!r} (e.g. q4_0, iq4_nl, q4_k, q5_0, q8_0, f16)") from None


def stored_type(name: str, cols: int) -> str:
    """The type llama.cpp stores a tensor with rows `cols` wide as, when asked for `name`."""
    name = name.lower()
    if name in BNB:
        if cols % 64:
            raise ValueError(f"no {name} storage for rows {cols} wide (blocks of 64)")
        return name
    block = gguf.GGML_QUANT_SIZES[qtype(name)][0]
    if cols % block == 0:
        return name
    if name in FALLBACK and cols % 32 == 0:
        return FALLBACK[name]
    raise ValueError(f"no {name} storage for rows {cols} wide")


def stored_types(cols: int, candidates=CANDIDATES) -> list[str]:
    """The distinct stored types the candidates give a tensor with rows `cols` wide, cheapest first."""
    out = sorted({stored_type(c, cols) for c in candidates}, key=lambda t: (bits_per_weight(t), t))
    return out


def bits_per_weight(name: str) -> float:
    """Bits per weight of a type (bnb-int8: without its per-row scale)."""
    if name in BNB:
        return 4.5 if name == "bnb-nf4" else 8.0
    block, size = gguf.GGML_QUANT_SIZES[qtype(name)]
    return 8 * size / block


def tensor_bytes(name: str, rows: int, cols: int) -> int:
    """Bytes of a rows x cols tensor stored as `name` (no fallback applied: pass a stored type)."""
    if name == "bnb-nf4":
        return rows * cols // 2 + rows * cols // 64 * 4
    if name == "bnb-int8":
        return rows * cols + rows * 4
    block, size = gguf.GGML_QUANT_SIZES[qtype(name)]
    if cols % block:
        raise ValueError(f"{name} needs rows a multiple of {block} wide, not {cols}")
    return rows * (cols // block) * size


@cache
def _lib():
    from edge.llamacpp.lib import ggml

    lib = ggml()
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def quantize(w: np.ndarray, name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """The bytes (rows, row bytes) llama.cpp's quantizer writes for w (rows, cols) as stored type `name`."""
    t = qtype(name)
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = w.shape
    if t in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return w.astype(np.float16 if t == gguf.GGMLQuantizationType.F16 else np.float32).view(np.uint8)
    out = np.empty((rows, tensor_bytes(name, 1, cols)), np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    if im is not None and im.shape != (cols,):
        raise ValueError(f"imatrix has {im.shape} entries for rows {cols} wide")
    n = _lib().ggml_quantize_chunk(int(t), w.ctypes.data, out.ctypes.data, 0, rows, cols,
                                   None if im is None else im.ctypes.data)
    if n != out.size:
        raise RuntimeError(f"ggml_quantize_chunk wrote {n} bytes for {name}, expected {out.size}")
    return out


def fake_quantize(w: np.ndarray, name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """w (rows, cols) rounded to stored type `name` as llama.cpp rounds it, back in float32."""
    q = quantize(w, name, imatrix)
    return np.asarray(gguf.quants.dequantize(q, qtype(name)), np.float32).reshape(w.shape)
