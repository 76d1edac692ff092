"""Shallow-stage runtimes for the edge: torch (fp32/bf16), bitsandbytes int8/nf4 (bnb.py) and llama.cpp GGUF
(llamacpp.py); `make_backend(kind, path, **kw)` (registry.py) builds any of them, importing its runtime lazily."""

from edge.backends.base import EdgeBackend
from edge.backends.registry import KINDS, make_backend
from edge.backends.torch_backend import TorchBackend

__all__ = ["EdgeBackend", "KINDS", "TorchBackend", "make_backend"]
