"""The decode batch's keys and values, kept gathered from one static step to the next (a CPU without graphs).

A static step attends each row over the whole blocks of its table. Gathering those blocks out of the pool, per
layer, is a copy from memory the size of the batch's KV: on a CPU, 4.6 ms of a 31 ms decode tick at 64 sessions
of the default shape, where a plain batched step reads its contiguous cache in place. When the next step serves the
same sessions in the same order, each one a row further, over the same table width, and nothing else wrote to the
pool in between, the gathered blocks still hold every key below each row's new position: the step writes its new
rows' keys and values there (as it writes them into the pool) and attends over them, gathering nothing. Anything
else (another batch, a wider table, a prompt chunk or any other write to the pool, a row that is not its session's
next) gathers anew.

The tensors attended over have the shapes, strides and, below each row's length, the values of a fresh gather, so
the results are the same bit for bit. Keys past a row's length may differ (stale either way) and are masked.

Kept per layer, so they cost the batch's KV a second time: above `max_bytes` (a quarter of the pool's bytes) the
step gathers into the pool's shared buffers as before.

Shapes: B rows, W table width in blocks, S = W x block_size key positions, K kv heads, D head dim.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cloud.engine.kv_pool import KVPool


class KeptGather:
    def __init__(self, pool: KVPool, layers: int) -> None:
        self.pool, self.layers = pool, layers
        self.max_bytes = pool.k.numel() * pool.k.element_size() // 2  # K and V: a quarter of the pool's bytes
        self._most = self.max_bytes // (layers * pool.bytes_per_block)  # blocks a layer's K (or V) copy may hold
        self._dense: list[list[Tensor | None]] = [[None] * layers, [None] * layers]  # (B*W, bs*K*D) by K/V, layer
        self._held: tuple | None = None  # (slots, width, pool writes, positions) of the batch the buffers hold
        self.fresh = True  # this step gathers (else it appends its rows)
        self.gathers = self.appends = 0  # steps of each kind (tests, benchmarks)

    def begin(self, slots: np.ndarray, positions: np.ndarray, n: int, width: int) -> bool:
        """Before a step whose rows, of the sessions at `slots` (B,; the first n real, the rest padding that
        nothing reads back), write positions (B,) over tables `width` blocks wide: whether the buffers are used
        (False: too large to keep), and `fresh`, whether they gather."""
        pool, b = self.pool, len(slots)
        if b * width > self._most:
            self._held = None
            return False
        held = self._held
        self.fresh = not (held is not None and held[1] == width and held[2] == pool.writes
                          and np.array_equal(held[0], slots) and np.array_equal(held[3][:n] + 1, positions[:n]))
        self._held = (slots.copy(), width, pool.writes, positions.copy())
        if self.fresh:
            self.gathers += 1
        else:
            self.appends += 1
            self._at = torch.arange(b, device=pool.device), torch.from_numpy(positions).to(pool.device)
        return True

    def forget(self) -> None:
        """After a step that failed part way: the buffers may hold part of a batch, so the next step gathers."""
        self._held = None

    def attend(self, i: int, q: Tensor, k: Tensor, v: Tensor, tables: Tensor, keys: int, mask: Tensor | None
               ) -> Tensor:
        """Layer i (counted from the step's first) of `begin`'s step: q (B, H, 1, D) and the rows' own k, v
        (B, K, D), already written to the pool, over tables (B, W), their first `keys` positions under `mask`
        (KVPool.decode_mask)."""
        pool, dense = self.pool, self._dense
        b, w = tables.shape
        flat = tables.flatten()
        for j, (src, row) in enumerate(((pool.k, k), (pool.v, v))):
            if self.fresh:  # into the pool's reused buffer for this layer's K (V), kept to the next step
                dense[j][i] = pool.gather_blocks(src, flat, ("kept", j, i), most=self._most)
            else:  # the same batch, a row further: its rows' new keys (values) at their positions
                dense[j][i].view(b, w * pool.block_size, pool.n_kv, pool.head_dim).index_put_(self._at, row)
        return pool.attend_gathered(q, dense[0][i], dense[1][i], w, keys, mask)
