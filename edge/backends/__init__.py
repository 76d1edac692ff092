"""Shallow-stage runtimes for the edge behind one contract (`base`: EdgeBackend): `torch_backend` (fp32/bf16),
`bnb` (bitsandbytes int8/nf4) and `llamacpp` (llama.cpp GGUF, whole or segments, with `gguf_heads` reading the
exit heads a GGUF carries); `registry` (`make_backend(kind, path, **kw)`) builds any of them, importing its runtime
lazily, and exports a checkpoint directory to GGUF on first use. May import edge.llamacpp and edge.export."""

from edge.backends.base import EdgeBackend
from edge.backends.registry import KINDS, make_backend
from edge.backends.torch_backend import TorchBackend

__all__ = ["EdgeBackend", "KINDS", "TorchBackend", "make_backend"]
