"""Paged KV memory for the engine: one preallocated pool of fixed-size blocks on the server's device, each
session's block tables over it, and the batched attention that reads every row's own session's blocks.

A block holds `block_size` positions of one layer's keys and values, so a session owns one block table per layer
it runs, and a layer whose positions lag behind (tokens that exited early) holds fewer blocks. The pool is sized
from the KV budget; the budget check is a block count.

Shapes: N packed rows of a tick, H heads, K kv heads, D head dim, S keys of a sequence, P slots = blocks x size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from coexit.attention import attend
from coexit.config import Config
from coexit.kv_cache import CacheError, LayerLengths


class KVPool:
    """Flat key/value slot storage (P, K, D) in blocks of `block_size` slots, with a free list."""

    def __init__(self, num_blocks: int, block_size: int, n_kv: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs at least one block of at least one slot, got {num_blocks} x "
                             f"{block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.n_kv, self.head_dim, self.dtype, self.device = n_kv, head_dim, dtype, torch.device(device)
        # empty: on a CPU the pages stay untouched (no RSS) until used; blocks are zeroed when handed out, since
        # padded gathers read unused slots (masked out, but they must stay finite)
        self.k = torch.empty(num_blocks * block_size, n_kv, head_dim, dtype=dtype, device=self.device)
        self.v = torch.empty_like(self.k)
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._scratch: list[Tensor | None] = [None, None]  # reused gather buffers for keys and values

    @staticmethod
    def block_bytes(block_size: int, n_kv: int, head_dim: int, dtype: torch.dtype) -> int:
        """Keys and values of `block_size` positions of one layer."""
        return 2 * block_size * n_kv * head_dim * dtype.itemsize

    @classmethod
    def from_budget(cls, config: Config, budget_bytes: int, block_size: int, dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> KVPool:
        k, d = config.num_key_value_heads, config.head_dim
        return cls(max(1, budget_bytes // cls.block_bytes(block_size, k, d, dtype)), block_size, k, d, dtype, device)

    @property
    def bytes_per_block(self) -> int:
        return self.block_bytes(self.block_size, self.n_kv, self.head_dim, self.dtype)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def gather_blocks(self, src: Tensor, blocks: Tensor, buffer: int) -> Tensor:
        """Whole blocks (len(blocks), block_size * K * D) of src (self.k or self.v), into a reused buffer: a fresh
        multi-MB tensor per layer would cost a page fault per 4 KiB on every tick."""
        rows = src.view(self.num_blocks, -1)
        n = blocks.numel()
        buf = self._scratch[buffer]
        if buf is None or buf.shape[0] < n:
            buf = self._scratch[buffer] = torch.empty(max(n, 2 * (buf.shape[0] if buf is not None else 0)),
                                                      rows.shape[1], dtype=self.dtype, device=self.device)
        return torch.index_select(rows, 0, blocks, out=buf[:n])

    def block_mask(self, lengths: Tensor, width: int) -> tuple[Tensor, Tensor]:
        """Key positions (B, S) and validity (B, S) for rows attending over `width` whole blocks, S = width x
        block_size: keys at positions >= a row's length are padding."""
        key_pos = torch.arange(width * self.block_size, device=self.device)
        return key_pos[None].expand(lengths.shape[0], -1), key_pos[None, :] < lengths[:, None]

    def attend_blocks(self, q: Tensor, tables: Tensor, positions: Tensor, key_pos: Tensor, valid: Tensor,
                      reuse_buffers: bool = True) -> Tensor:
        """Decode attention: q (B, H, 1, D) at positions (B, 1) over the whole blocks tables (B, W) of the pool.
        With reuse_buffers the gathers go into the pool's reused buffers (not inside a captured CUDA graph,
        whose buffers must keep their addresses)."""
        b, w = tables.shape
        flat = tables.flatten()
        kk, vv = ((self.gather_blocks(t, flat, i) if reuse_buffers
                   else t.view(self.num_blocks, -1).index_select(0, flat))
                  .view(b, w * self.block_size, self.n_kv, self.head_dim).transpose(1, 2).to(q.dtype)
                  for i, t in enumerate((self.k, self.v)))  # (B, K, S, D)
        return attend(q, kk, vv, positions, key_pos, valid)

    def allocate(self, n: int) -> list[int] | None:
        """n block ids, or None (and nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        ids = [self._free.pop() for _ in range(n)]
        slots = (torch.tensor(ids)[:, None] * self.block_size + torch.arange(self.block_size)).flatten()
        slots = slots.to(self.device)
        self.k[slots] = 0
        self.v[slots] = 0
        return ids

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedCache(LayerLengths):
    """One session's KV over `layers`: a block table and a filled length per layer (a prefix, as in KVCache).

    It offers the KVCache interface the model and LayerRunner use (length, attend, get, truncate), so a session can
    also be run alone on it; the engine writes and reads it for many sessions at once through BatchAttention."""

    def __init__(self, pool: KVPool, layers: range) -> None:
        super().__init__(layers)
        self.pool = pool
        self.tables: dict[int, list[int]] = {layer: [] for layer in layers}

    @property
    def num_blocks(self) -> int:
        return sum(len(t) for t in self.tables.values())

    def blocks_needed(self, upto: int) -> int:
        """Blocks still to allocate so that every layer can hold positions [0, upto)."""
        want = math.ceil(upto / self.pool.block_size)
        return sum(max(0, want - len(t)) for t in self.tables.values())

    def grow(self, upto: int) -> bool:
        """Allocate blocks so every layer can hold `upto` positions; all or nothing."""
        need = self.blocks_needed(upto)
        if need == 0:
            return True
        got = self.pool.allocate(need)
        if got is None:
            return False
        want = math.ceil(upto / self.pool.block_size)
        for table in self.tables.values():
            while len(table) < want:
                table.append(got.pop())
        return True

    def truncate(self, length: int) -> None:
        """Forget positions >= length at every layer and return the blocks no longer needed."""
        keep = math.ceil(length / self.pool.block_size)
        for layer in self.layers:
            self.lengths[layer] = min(self.lengths[layer], length)
            table = self.tables[layer]
            if len(table) > keep:
                self.pool.release(table[keep:])
                del table[keep:]

    def release(self) -> None:
        self.truncate(0)

    def slots(self, layer: int, start: int, stop: int) -> Tensor:
        """Pool slot ids (stop - start,) of positions [start, stop) at `layer`."""
        bs = self.pool.block_size
        pos = torch.arange(start, stop)
        table = torch.tensor(self.tables[layer], dtype=torch.long)
        return (table[pos // bs] * bs + pos % bs).to(self.pool.device)

    def claim(self, layer: int, first: int, n: int) -> list[int]:
        """Slot ids for n new positions from `first` at `layer`, which must continue the layer without a gap."""
        have, table, bs = self.lengths[layer], self.tables[layer], self.pool.block_size
        if have != first:
            raise CacheError(f"layer {layer} holds {have} positions but the new rows start at position {first}")
        if first + n > len(table) * bs:
            raise CacheError(f"layer {layer}: positions up to {first + n} exceed the session's blocks; grow() first")
        self.lengths[layer] = first + n
        return [table[p // bs] * bs + p % bs for p in range(first, first + n)]

    def get(self, layer: int) -> tuple[Tensor, Tensor]:
        """Keys and values (1, K, S, D) of the filled positions at `layer`."""
        idx = self.slots(layer, 0, self.lengths[layer])
        return self.pool.k[idx].transpose(0, 1)[None], self.pool.v[idx].transpose(0, 1)[None]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """One sequence (B == 1): store k, v (1, K, T, D) at the layer's length and attend q (1, H, Tq, D) at
        `positions` (1, Tq) over all its keys (Tq < T when some rows only store their KV)."""
        first, n = self.lengths[layer], k.shape[2]
        fill = None
        if q.shape[2] != n:
            fill = torch.ones(n, dtype=torch.bool)
            fill[(positions[0] - first).cpu()] = False
        return BatchAttention([(self, first, n)], fill).attend(layer, q, k, v, positions)


class BatchAttention:
    """The cache a tick's batched layer call sees: rows of several sessions packed along T (B == 1), in
    `segments` order (cache, first position, rows). Writes each row's k, v into its session's blocks, then attends
    the query rows: segments with one query row (decode) in one padded call, the others (prompt chunks, catch-up)
    one each. fill (N,) bool marks rows that only store their k, v (propagated KV): they are not queries, so q
    holds the other rows only, in order."""

    def __init__(self, segments: list[tuple[PagedCache, int, int]], fill: Tensor | None = None) -> None:
        self.segments = segments
        self.pool = pool = segments[0][0].pool
        # singles: (query row, cache, position of the query); multis: (query row, cache, first, n, queries)
        self.singles, self.multis, row, qrow = [], [], 0, 0
        for c, first, n in segments:
            offsets = list(range(n)) if fill is None else (~fill[row:row + n]).nonzero().flatten().tolist()
            if len(offsets) == 1:
                self.singles.append((qrow, c, first + offsets[0]))
            elif offsets:
                self.multis.append((qrow, c, first, n, len(offsets)))
            row, qrow = row + n, qrow + len(offsets)
        if self.singles:  # layer-independent parts of the decode call
            self.rows = torch.tensor([r for r, _, _ in self.singles], device=pool.device)
            self.lengths = torch.tensor([pos + 1 for _, _, pos in self.singles], device=pool.device)
            self._masks: dict[int, tuple[Tensor, Tensor]] = {}

    def _mask(self, width: int) -> tuple[Tensor, Tensor]:
        if width not in self._masks:  # the same for every layer with this table width
            self._masks[width] = self.pool.block_mask(self.lengths, width)
        return self._masks[width]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        pool = self.pool
        slots = torch.tensor([i for c, first, n in self.segments for i in c.claim(layer, first, n)],
                             device=pool.device)
        pool.k[slots] = k[0].transpose(0, 1).to(pool.dtype)  # (N, K, D)
        pool.v[slots] = v[0].transpose(0, 1).to(pool.dtype)
        y = torch.empty_like(q)  # (1, H, Nq, D)
        for row, c, first, n, nq in self.multis:  # a multi-row segment: its own causal attention over its prefix
            idx = c.slots(layer, 0, first + n)
            kk, vv = pool.k[idx].transpose(0, 1)[None], pool.v[idx].transpose(0, 1)[None]
            key_pos = torch.arange(first + n, device=q.device)[None]
            y[:, :, row:row + nq] = attend(q[:, :, row:row + nq], kk.to(q.dtype), vv.to(q.dtype),
                                           positions[:, row:row + nq], key_pos)
        if self.singles:  # decode rows: gather whole blocks of every session's table, pad to the widest
            width = max(len(c.tables[layer]) for _, c, _ in self.singles)
            tables = torch.tensor([c.tables[layer] + [0] * (width - len(c.tables[layer]))
                                   for _, c, _ in self.singles], device=pool.device)
            rows = self.rows
            qq = q[0, :, rows].transpose(0, 1)[:, :, None]  # (B, H, 1, D)
            out = pool.attend_blocks(qq, tables, positions[0, rows][:, None], *self._mask(width))
            y[0, :, rows] = out[:, :, 0].transpose(0, 1)
        return y
