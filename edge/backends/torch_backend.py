"""The torch edge backend: coexit's own model over layers [0, split), fp32 or bf16. A token that exits early
really skips the remaining edge layers; its missing KV is recomputed in one batch when a later token needs
those layers (coexit.decoding.LayerRunner, the same mechanism the cloud uses)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from coexit.checkpoint import load, read_config
from coexit.decoding import Decide, LayerRunner, RunResult
from coexit.model import EarlyExitLM
from edge.backends.base import EdgeBackend


def load_edge(path, dtype: torch.dtype | None = torch.float32, adapter: str | Path | None = None) -> EarlyExitLM:
    """Layers [0, split) of a checkpoint, with a LoRA adapter merged in when one is given."""
    model = load(path, layers=(0, read_config(path).split_layer), dtype=dtype)
    if adapter is not None:
        from coexit.lora import merge_adapter

        merge_adapter(model, adapter)
    return model


class TorchBackend(EdgeBackend):
    name = "torch"

    def __init__(self, model: EarlyExitLM, max_len: int | None = None) -> None:
        self.model, self.config = model, model.config
        self.fingerprint = model.fingerprint
        self.max_len = max_len
        if model.start != 0 or model.stop < self.config.split_layer:
            raise ValueError(f"the edge needs layers [0, {self.config.split_layer}); model holds {model.layer_range}")
        self.reset()

    @classmethod
    def from_checkpoint(cls, path, dtype: torch.dtype | None = torch.float32, max_len: int | None = None,
                        adapter: str | Path | None = None):
        """adapter: a LoRA adapter directory (PEFT layout, coexit.lora), merged into the edge's weights."""
        return cls(load_edge(path, dtype, adapter), max_len=max_len)

    @property
    def max_length(self) -> int:
        return self.max_len or self.config.max_position_embeddings

    def reset(self) -> None:
        self.runner = LayerRunner(self.model, 0, self.config.split_layer, max_len=self.max_len)

    def step(self, token_ids: list[int], first: int, decide: Decide | None, to_split: bool = False) -> RunResult:
        return self.runner.run(torch.tensor(token_ids, dtype=torch.long), first, decide, self.exit_layers,
                               to_stop=to_split)

    def truncate(self, length: int) -> None:
        self.runner.truncate(length)

    def take_split_rows(self) -> tuple[int, Tensor]:
        first, rows = self.runner.take_top()
        return first, rows.float()

    @property
    def next_position(self) -> int:
        return self.runner.next_position

    @property
    def layer_tokens(self) -> int:
        return self.runner.layer_tokens
