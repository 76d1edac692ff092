"""Shallow-stage runtimes for the edge: torch (fp32/bf16) here; quantized ones register beside it."""

from edge.backends.base import EdgeBackend
from edge.backends.torch_backend import TorchBackend

__all__ = ["EdgeBackend", "TorchBackend"]
