"""Paged KV memory for the engine: one preallocated pool of fixed-size blocks on the server's device, each
session's block tables over it, and the batched attention that reads every row's own session's blocks.

A block holds `block_size` positions of one layer's keys and values, so a session owns one block table per layer
it runs, and a layer whose positions lag behind (tokens that exited early) holds fewer blocks. The pool is sized
from the KV budget; the budget check is a block count.

Shapes: N packed rows of a tick, H heads, K kv heads, D head dim, S keys of a sequence, P slots = blocks x size.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from cloud.engine.slots import LengthsView, SlotTables
from coexit.attention import attend, attend_one
from coexit.config import Config
from coexit.kv_cache import CacheError, LayerLengths


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zero tensor; on a CPU backed by numpy's calloc, whose pages are mapped (and count in RSS) only when
    touched, where torch.zeros would write every page now."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    raw = np.zeros(math.prod(shape) * dtype.itemsize, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).view(shape)


def packed_positions(firsts: np.ndarray, ns: np.ndarray) -> np.ndarray:
    """Positions (sum(ns),) of segments packed along T, segment i holding ns[i] rows from position firsts[i]."""
    return np.arange(int(ns.sum())) + np.repeat(firsts - (np.cumsum(ns) - ns), ns)


class KVPool:
    """Flat key/value slot storage (P, K, D) in blocks of `block_size` slots, with a free list."""

    def __init__(self, num_blocks: int, block_size: int, n_kv: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs at least one block of at least one slot, got {num_blocks} x "
                             f"{block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.n_kv, self.head_dim, self.dtype, self.device = n_kv, head_dim, dtype, torch.device(device)
        # Zeroed once, here: padded gathers read slots no row has written (masked out, but they must be finite),
        # and every value written later is finite (uploaded rows are checked), so no block is zeroed again when it
        # is handed out. On a CPU the zeros come from calloc'd pages the kernel maps on first touch: no RSS until
        # used.
        shape = (num_blocks * block_size, n_kv, head_dim)
        self.k, self.v = (_zeros(shape, dtype, self.device) for _ in range(2))
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.tables = SlotTables()  # every session's block tables and lengths, by slot
        self._scratch: dict = {}  # reused gather buffers, by key (0, 1: keys and values; kept.py's own)
        self.writes = 0  # counts the passes that wrote K/V other than static decode steps (kept.py)

    @staticmethod
    def block_bytes(block_size: int, n_kv: int, head_dim: int, dtype: torch.dtype) -> int:
        """Keys and values of `block_size` positions of one layer."""
        return 2 * block_size * n_kv * head_dim * dtype.itemsize

    @classmethod
    def from_budget(cls, config: Config, budget_bytes: int, block_size: int, dtype: torch.dtype,
                    device: torch.device | str = "cpu", kv_heads: int | None = None) -> KVPool:
        """kv_heads: the KV heads this process holds (a tensor-parallel rank's share; default all)."""
        k, d = kv_heads or config.num_key_value_heads, config.head_dim
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

    def gather_blocks(self, src: Tensor, blocks: Tensor, buffer, most: int | None = None) -> Tensor:
        """Whole blocks (len(blocks), block_size * K * D) of src (self.k or self.v), into a reused buffer (`buffer`:
        its key; it grows by doubling, to at most `most` blocks when given): a fresh multi-MB tensor per layer would
        cost a page fault per 4 KiB on every tick."""
        rows = src.view(self.num_blocks, -1)
        n = blocks.numel()
        buf = self._scratch.get(buffer)
        if buf is None or buf.shape[0] < n:
            grown = 2 * (buf.shape[0] if buf is not None else 0)
            buf = self._scratch[buffer] = torch.empty(max(n, grown if most is None else min(grown, most)),
                                                      rows.shape[1], dtype=self.dtype, device=self.device)
        return torch.index_select(rows, 0, blocks, out=buf[:n])

    def decode_mask(self, lengths: Tensor, width: int, known: np.ndarray | None = None) -> tuple[int, Tensor | None]:
        """What decode rows (one query each, at position length - 1; lengths (B,)) attend over `width` whole blocks
        of their tables: the first `keys` key positions under mask (B, 1, 1, keys), the keys below each row's
        length. Where the host knows the lengths (`known`, the same (B,) on the host; not inside a captured graph),
        the keys stop at the longest row's length, and the mask is None when every row is that long (every row
        sees every key): SDPA's unmasked CPU path is faster, and a plain batched step of sequences alike takes it
        too. Without them, every position of the blocks. The same for every layer of a step."""
        if known is None:
            keys = width * self.block_size
        else:
            keys = int(known.max())
            if (known == keys).all():
                return keys, None
        key_pos = torch.arange(keys, device=self.device)
        return keys, (key_pos[None, :] < lengths[:, None])[:, None, None, :]

    def attend_blocks(self, q: Tensor, tables: Tensor, keys: int, mask: Tensor | None,
                      reuse_buffers: bool = True) -> Tensor:
        """Decode attention: q (B, H, 1, D) over the whole blocks tables (B, W) of the pool, their first `keys`
        positions under `mask` (decode_mask). With reuse_buffers the gathers go into the pool's reused buffers
        (not inside a captured CUDA graph, whose buffers must keep their addresses)."""
        flat = tables.flatten()
        k, v = (self.gather_blocks(t, flat, i) if reuse_buffers else t.view(self.num_blocks, -1).index_select(0, flat)
                for i, t in enumerate((self.k, self.v)))
        return self.attend_gathered(q, k, v, tables.shape[1], keys, mask)

    def attend_gathered(self, q: Tensor, k: Tensor, v: Tensor, width: int, keys: int, mask: Tensor | None) -> Tensor:
        """Decode attention of q (B, H, 1, D) over k and v (B x width, block_size * K * D): each row's `width`
        whole blocks, gathered row by row, of which the first `keys` positions are attended under `mask`."""
        kk, vv = (x.view(q.shape[0], width * self.block_size, self.n_kv, self.head_dim)[:, :keys].transpose(1, 2)
                  .to(q.dtype) for x in (k, v))  # (B, K, keys, D)
        return attend_one(q, kk, vv, mask)

    def attend_prefix(self, q: Tensor, idx: Tensor, positions: Tensor) -> Tensor:
        """One sequence's query rows q (1, H, T, D) at positions (1, T), causally over the keys at pool slots idx
        (S,), which hold its positions [0, S) in order."""
        kk, vv = self.k[idx].transpose(0, 1)[None], self.v[idx].transpose(0, 1)[None]
        key_pos = torch.arange(idx.shape[0], device=q.device)[None]
        return attend(q, kk.to(q.dtype), vv.to(q.dtype), positions, key_pos)

    def allocate(self, n: int) -> list[int] | None:
        """n block ids, or None (and nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        if n == 0:
            return []
        ids = self._free[-n:][::-1]
        del self._free[-n:]
        return ids

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def grow_rows(self, slots: np.ndarray, layers: range) -> bool:
        """One more block at each of `layers` for the sessions at `slots` (a steady decode tick's rows that cross
        into a new block), in one allocation; all or nothing."""
        t = self.tables
        got = self.allocate(len(slots) * len(layers))
        if got is None:
            return False
        nb = t.nblocks[layers.start, slots]
        t.reserve_width(int(nb.max()) + 1)
        ids = np.array(got, dtype=np.int32).reshape(len(slots), len(layers)).T  # (layers, rows)
        t.blocks[layers.start:layers.stop][:, slots, nb] = ids
        t.nblocks[layers.start:layers.stop, slots] += 1
        t.changed.update(slots.tolist())
        return True

    def grow_slots(self, slots: np.ndarray, uptos: np.ndarray, layers: range) -> bool:
        """Blocks so that every one of `layers` of the sessions at `slots` holds positions [0, uptos[i]) (a tick's
        prompt chunks), in one allocation; all or nothing (False, nothing taken, when fewer blocks are free)."""
        t, bs = self.tables, self.block_size
        want = -(-uptos // bs)  # (k,) blocks each session needs
        have = t.nblocks[layers.start:layers.stop, slots]  # (L, k)
        need = np.maximum(want - have, 0)
        total = int(need.sum())
        if total == 0:
            return True
        got = self.allocate(total)
        if got is None:
            return False
        t.reserve_width(int(want.max()))
        # flat indices into blocks (layers, slots, width): each (layer, session) pair's new columns, consecutive
        _, cap, width = t.blocks.shape
        start = ((np.arange(layers.start, layers.stop)[:, None] * cap + slots) * width + have).ravel()
        np.put(t.blocks, packed_positions(start, need.ravel()), got)
        t.nblocks[layers.start:layers.stop, slots] = np.maximum(have, want)
        t.changed.update(slots.tolist())
        return True


class PagedCache(LayerLengths):
    """One session's KV over `layers`: a block table and a filled length per layer (a prefix, as in KVCache), kept
    in the pool's slot-indexed arrays (`pool.tables`, cloud/engine/slots.py) at this cache's slot.

    It offers the KVCache interface the model and LayerRunner use (length, attend, get, truncate), so a session can
    also be run alone on it; the engine writes and reads it for many sessions at once through BatchAttention, or
    through the arrays directly on a steady decode tick."""

    def __init__(self, pool: KVPool, layers: range) -> None:
        self.layers = layers
        self.pool = pool
        self.slot = pool.tables.acquire(layers.stop)

    @property
    def lengths(self) -> LengthsView:
        """{layer: filled length}, read and written in the pool's arrays (made on access: a view kept here would
        hold this cache in a reference cycle, which only Python's cyclic GC frees, and the engine's ticks pay for
        every such collection)."""
        return LengthsView(self.pool.tables, self._slot, self.layers)

    def _slot(self) -> int:
        if self.slot < 0:  # released, then used again: take a fresh slot
            self.slot = self.pool.tables.acquire(self.layers.stop)
        return self.slot

    def length(self, layer: int) -> int:
        return int(self.pool.tables.lengths[layer, self._slot()])

    def table(self, layer: int) -> np.ndarray:
        """Block ids (n,) of `layer` (a view: valid until the tables grow)."""
        t, slot = self.pool.tables, self._slot()
        return t.blocks[layer, slot, :t.nblocks[layer, slot]]

    @property
    def tables(self) -> dict[int, list[int]]:
        """{layer: block ids} (a copy)."""
        return {layer: self.table(layer).tolist() for layer in self.layers}

    @property
    def num_blocks(self) -> int:
        return int(self.pool.tables.nblocks[self.layers.start:self.layers.stop, self._slot()].sum())

    def blocks_needed(self, upto: int) -> int:
        """Blocks still to allocate so that every layer can hold positions [0, upto)."""
        want = math.ceil(upto / self.pool.block_size)
        have = self.pool.tables.nblocks[self.layers.start:self.layers.stop, self._slot()]
        return int(np.maximum(want - have, 0).sum())

    def grow(self, upto: int, need: int | None = None) -> bool:
        """Allocate blocks so every layer can hold `upto` positions; all or nothing. need: `blocks_needed(upto)`
        when the caller has it already."""
        need = self.blocks_needed(upto) if need is None else need
        if need == 0:
            return True
        got = self.pool.allocate(need)
        if got is None:
            return False
        want = math.ceil(upto / self.pool.block_size)
        t, slot = self.pool.tables, self.slot
        t.reserve_width(want)
        t.changed.add(slot)
        for layer in self.layers:
            have = int(t.nblocks[layer, slot])
            if have < want:  # the same ids, in the same order, as popping them one by one
                cut = len(got) - (want - have)
                t.blocks[layer, slot, have:want] = got[cut:][::-1]
                del got[cut:]
                t.nblocks[layer, slot] = want
        return True

    def truncate(self, length: int) -> None:
        """Forget positions >= length at every layer and return the blocks no longer needed."""
        keep = math.ceil(length / self.pool.block_size)
        t, slot = self.pool.tables, self._slot()
        for layer in self.layers:
            if t.lengths[layer, slot] > length:
                t.lengths[layer, slot] = length
            n = int(t.nblocks[layer, slot])
            if n > keep:
                self.pool.release(t.blocks[layer, slot, keep:n].tolist())
                t.nblocks[layer, slot] = keep
                t.changed.add(slot)

    def release(self) -> None:
        """Free every block and the slot (a later use takes a new slot)."""
        if self.slot >= 0:
            self.truncate(0)
            self.pool.tables.release(self.slot)
            self.slot = -1

    def slots(self, layer: int, start: int, stop: int) -> Tensor:
        """Pool slot ids (stop - start,) of positions [start, stop) at `layer`."""
        bs = self.pool.block_size
        pos = torch.arange(start, stop)
        table = torch.from_numpy(self.table(layer).astype(np.int64))
        return (table[pos // bs] * bs + pos % bs).to(self.pool.device)

    def claim(self, layer: int, first: int, n: int) -> list[int]:
        """Slot ids for n new positions from `first` at `layer`, which must continue the layer without a gap."""
        t, slot, bs = self.pool.tables, self._slot(), self.pool.block_size
        have, nb = int(t.lengths[layer, slot]), int(t.nblocks[layer, slot])
        if have != first:
            raise CacheError(f"layer {layer} holds {have} positions but the new rows start at position {first}")
        if first + n > nb * bs:
            raise CacheError(f"layer {layer}: positions up to {first + n} exceed the session's blocks; grow() first")
        t.lengths[layer, slot] = first + n
        if n == 1:
            return [int(t.blocks[layer, slot, first // bs]) * bs + first % bs]
        pos = np.arange(first, first + n)
        return (t.blocks[layer, slot, pos // bs].astype(np.int64) * bs + pos % bs).tolist()

    def get(self, layer: int) -> tuple[Tensor, Tensor]:
        """Keys and values (1, K, S, D) of the filled positions at `layer`."""
        idx = self.slots(layer, 0, self.length(layer))
        return self.pool.k[idx].transpose(0, 1)[None], self.pool.v[idx].transpose(0, 1)[None]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """One sequence (B == 1): store k, v (1, K, T, D) at the layer's length and attend q (1, H, Tq, D) at
        `positions` (1, Tq) over all its keys (Tq < T when some rows only store their KV)."""
        first, n = self.length(layer), k.shape[2]
        fill = None
        if q.shape[2] != n:
            fill = torch.ones(n, dtype=torch.bool)
            fill[(positions[0] - first).cpu()] = False
        return BatchAttention([(self, first, n)], fill).attend(layer, q, k, v, positions)


class BatchAttention:
    """The cache a tick's batched layer call sees: rows of several sessions packed along T (B == 1), in
    `segments` order (cache, first position, rows). Writes each row's k, v into its session's blocks (the slots of
    all rows claimed at once, `claim`), then attends the query rows: segments with one query row (decode) in one
    padded call, the others (prompt chunks, catch-up) one each. fill (N,) bool marks rows that only store their
    k, v (propagated KV): they are not queries, so q holds the other rows only, in order. stop: the layer below
    which the same rows run on (the packed group's span ends there), so that the first claim checks and advances
    every layer of the span at once."""

    def __init__(self, segments: list[tuple[PagedCache, int, int]], fill: Tensor | None = None,
                 stop: int | None = None) -> None:
        self.segments = segments
        self._stop = stop
        self._claimed = range(0)  # layers whose lengths the rows were claimed at
        self.pool = pool = segments[0][0].pool
        self._caches = np.fromiter([c._slot() for c, _, _ in segments], dtype=np.int64, count=len(segments))
        self._firsts = np.fromiter([first for _, first, _ in segments], dtype=np.int64, count=len(segments))
        self._ns = np.fromiter([n for _, _, n in segments], dtype=np.int64, count=len(segments))
        self._slots: np.ndarray | None = None  # pool slot ids (layers, N) from layer `_base` on: see claim
        self._base = 0
        # singles: (query row, cache, position of the query); multis: (query row, cache, first, n, queries)
        self.singles, self.multis, row, qrow = [], [], 0, 0
        for c, first, n in segments:
            if fill is None:  # every row is a query
                nq, last = n, first + n - 1
            else:
                offsets = (~fill[row:row + n]).nonzero().flatten().tolist()
                nq, last = len(offsets), first + (offsets[0] if offsets else 0)
            if nq == 1:
                self.singles.append((qrow, c, last))
            elif nq:
                self.multis.append((qrow, c, first, n, nq))
            row, qrow = row + n, qrow + nq
        if self.singles:  # layer-independent parts of the decode call
            self.rows = torch.tensor([r for r, _, _ in self.singles], device=pool.device)
            self.lengths = torch.tensor([pos + 1 for _, _, pos in self.singles], device=pool.device)
            self.slot_ids = np.array([c.slot for _, c, _ in self.singles])
            self._masks: dict[int, tuple[int, Tensor | None]] = {}

    def _mask(self, width: int) -> tuple[int, Tensor | None]:
        if width not in self._masks:  # the same for every layer with this table width
            self._masks[width] = self.pool.decode_mask(self.lengths, width)
        return self._masks[width]

    def claim(self, layer: int) -> np.ndarray:
        """PagedCache.claim of every segment's rows at `layer`, at once: pool slot ids (N,) in row order."""
        t, bs, caches, firsts, ns = self.pool.tables, self.pool.block_size, self._caches, self._firsts, self._ns
        if layer not in self._claimed:  # every layer of the span at once: lengths checked, then advanced
            top = self._stop if self._stop is not None and self._stop > layer else layer + 1
            span, ends = slice(layer, top), firsts + ns
            bad = (t.lengths[span, caches] != firsts) | (ends > t.nblocks[span, caches] * bs)  # (layers, segments)
            if bad.any():  # the per-session check raises the error, at the lowest layer that fails, nothing claimed
                lay, i = (int(x) for x in np.argwhere(bad)[0])
                c, first, n = self.segments[i]
                c.claim(layer + lay, first, n)
            t.lengths[span, caches] = ends
            self._claimed = range(layer, top)
        if self._slots is None or layer < self._base:  # every later layer's slot ids at once (tables are fixed
            pos, rows = packed_positions(firsts, ns), np.repeat(caches, ns)  # for the tick: grown when scheduled)
            self._base = layer
            self._slots = t.blocks[layer:, rows, pos // bs].astype(np.int64) * bs + pos % bs  # (layers, N)
        return self._slots[layer - self._base]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        pool = self.pool
        slots = torch.from_numpy(self.claim(layer)).to(pool.device)
        pool.k[slots] = k[0].transpose(0, 1).to(pool.dtype)  # (N, K, D)
        pool.v[slots] = v[0].transpose(0, 1).to(pool.dtype)
        pool.writes += 1
        y = torch.empty_like(q)  # (1, H, Nq, D)
        for row, c, first, n, nq in self.multis:  # a multi-row segment: its own causal attention over its prefix
            y[:, :, row:row + nq] = pool.attend_prefix(q[:, :, row:row + nq], c.slots(layer, 0, first + n),
                                                       positions[:, row:row + nq])
        if self.singles:  # decode rows: gather whole blocks of every session's table, pad to the widest
            t = pool.tables
            slots = self.slot_ids
            width = int(t.nblocks[layer, slots].max())
            tables = torch.from_numpy(t.blocks[layer, slots, :width].astype(np.int64)).to(pool.device)
            rows = self.rows
            qq = q[0, :, rows].transpose(0, 1)[:, :, None]  # (B, H, 1, D)
            out = pool.attend_blocks(qq, tables, *self._mask(width))
            y[0, :, rows] = out[:, :, 0].transpose(0, 1)
        return y
