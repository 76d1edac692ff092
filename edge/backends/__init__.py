"""Shallow-stage runtimes for the edge, chosen by name with make_backend()."""

from __future__ import annotations

from edge.backends.base import EdgeBackend
from edge.backends.torch_backend import TorchBackend

BACKENDS = ("torch",)


def make_backend(kind: str, model_dir, **kw) -> EdgeBackend:
    if kind == "torch":
        return TorchBackend.from_checkpoint(model_dir, **kw)
    raise ValueError(f"unknown edge backend {kind!r}; use one of {BACKENDS}")


__all__ = ["BACKENDS", "EdgeBackend", "TorchBackend", "make_backend"]
