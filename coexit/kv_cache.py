"""The explicit KV cache passed into forward: per-layer keys/values plus each layer's filled length.

Each layer's filled positions always form a prefix [0, length(l)): KV recomputation guarantees that before a
position is computed at layer l, every earlier position has KV at layer l. Positions that exited early therefore
show up as layers whose length lags behind (their depth). Storage grows by doubling up to max_len, so a session's
memory is what it uses, and `nbytes` is what a memory budget counts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from coexit.attention import attend, attend_one
from coexit.config import Config


class CacheError(ValueError):
    """A write that would leave a gap or overlap in a layer's positions, or overflow max_len."""


class LayerLengths:
    """Each layer's filled prefix length: the depth bookkeeping every KV cache keeps (this one, and the cloud
    engine's paged cache)."""

    def __init__(self, layers: range) -> None:
        self.layers = layers
        self.lengths: dict[int, int] = {layer: 0 for layer in layers}

    def length(self, layer: int) -> int:
        return self.lengths[layer]

    def depth_lengths(self) -> list[int]:
        return [self.lengths[i] for i in self.layers]


class KVCache(LayerLengths):
    def __init__(self, config: Config, layers: range, batch_size: int = 1, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 n_kv: int | None = None) -> None:
        """n_kv: the KV heads stored (default config's; a tensor-parallel rank stores only its own)."""
        super().__init__(layers)
        self.batch_size = batch_size
        self.max_len = max_len or config.max_position_embeddings
        self.n_kv, self.head_dim = n_kv or config.num_key_value_heads, config.head_dim
        self.dtype, self.device = dtype, torch.device(device or "cpu")
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))

    def bytes_per_position(self) -> int:
        return 2 * len(self.layers) * self.batch_size * self.n_kv * self.head_dim * self.dtype.itemsize

    def _reserve(self, layer: int, needed: int) -> None:
        have = self.k[layer].shape[2] if layer in self.k else 0
        if needed <= have:
            return
        cap = min(self.max_len, max(needed, 2 * have, 16))
        shape = (self.batch_size, self.n_kv, cap, self.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if have:
            k[:, :, :have] = self.k[layer]
            v[:, :, :have] = self.v[layer]
        self.k[layer], self.v[layer] = k, v

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (B, K, T, D) at this layer's length; return all keys/values so far (B, K, S, D)."""
        start, t = self.lengths[layer], k.shape[2]
        end = start + t
        if end > self.max_len:
            raise CacheError(f"layer {layer}: {end} positions exceed the cache's max_len {self.max_len}")
        self._reserve(layer, end)
        kc, vc = self.k[layer], self.v[layer]
        kc.narrow(2, start, t).copy_(k)  # narrow + copy_: the same write as slice assignment, less overhead
        vc.narrow(2, start, t).copy_(v)
        self.lengths[layer] = end
        return kc.narrow(2, 0, end), vc.narrow(2, 0, end)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Store the new k, v (B, K, T, D) and attend q (B, H, T, D) at `positions` (B, T) over all keys.

        The new rows' positions continue the layer's filled prefix (EarlyExitLM.run_layers checks it for the first
        sequence of the batch), so one sequence's single query is at the newest position and sees every key."""
        k, v = self.update(layer, k, v)
        s = k.shape[2]
        if q.shape[2] == 1 and (q.shape[0] == 1 or (not positions.is_cuda and bool((positions >= s - 1).all()))):
            # no mask: every key is visible (and SDPA's masked CPU path is several times slower). On a GPU the
            # batched check would be a host sync, which also breaks CUDA graph capture: the mask path runs there
            return attend_one(q, k, v)
        key_pos = torch.arange(s, device=q.device)[None, :].expand(q.shape[0], -1)
        return attend(q, k, v, positions, key_pos)

    def get(self, layer: int) -> tuple[Tensor, Tensor]:
        n = self.lengths[layer]
        if n == 0:
            empty = torch.zeros(self.batch_size, self.n_kv, 0, self.head_dim, dtype=self.dtype, device=self.device)
            return empty, empty
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n]

    def truncate(self, length: int) -> None:
        """Forget every position >= length at every layer (rollback)."""
        for layer in self.layers:
            self.lengths[layer] = min(self.lengths[layer], length)
