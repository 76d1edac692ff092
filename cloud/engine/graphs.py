"""Decode-only ticks on static shapes: one step through all deep layers on fixed buffers, captured as a CUDA graph
per (batch-size bucket, block-table width) on a GPU and replayed; run eagerly elsewhere.

A tick qualifies when every chunk is one new row whose plan (`LayerRunner.steps`) is a single span over the whole
deep range: no catch-up rows, no exit checks on the way. That is the steady decode step. The rows are padded to a
batch-size bucket and the block tables to a width bucket; padded rows write into and read from a reserved scratch
block, and their outputs are dropped. Slot ids, tables and lengths are filled from the sessions' PagedCaches with
the same bookkeeping as the general path's `claim`, vectorized over the pool's slot-indexed arrays, so the caches
cannot tell which path ran. The buffers keep the last step's block tables; a step of the same sessions copies only
the tables that changed.

Shapes: B bucket rows, W table width in blocks, L deep layers, C hidden, K kv heads, D head dim.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cloud.engine.kv_pool import KVPool
from coexit.kv_cache import CacheError
from coexit.model import EarlyExitLM

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
WIDTHS = (4, 8, 16, 32, 64, 128, 256, 512, 1024)


def bucket(n: int, sizes=BATCH_BUCKETS) -> int:
    for b in sizes:
        if b >= n:
            return b
    return 1 << (n - 1).bit_length()


class _Buffers:
    def __init__(self, layers: int, b: int, w: int, c: int, dtype, device) -> None:
        self.h_in = torch.zeros(b, 1, c, dtype=dtype, device=device)
        self.h_out = torch.zeros_like(self.h_in)
        self.positions = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.lengths = torch.ones(b, dtype=torch.long, device=device)
        self.slots = torch.zeros(layers, b, dtype=torch.long, device=device)
        self.tables = torch.zeros(layers, b, w, dtype=torch.long, device=device)


class _StaticAttention:
    """The cache view of a static step: per layer, write each row's k, v at its slot, then attend over the blocks
    of its table (keys at positions < its length)."""

    def __init__(self, pool: KVPool, buf: _Buffers, start: int, reuse_buffers: bool = False) -> None:
        self.pool, self.buf, self.start, self.reuse = pool, buf, start, reuse_buffers
        self.key_pos, self.valid = pool.block_mask(buf.lengths, buf.tables.shape[2])

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        pool, buf, i = self.pool, self.buf, layer - self.start
        pool.k.index_copy_(0, buf.slots[i], k[:, :, 0].to(pool.dtype))  # (B, K, D)
        pool.v.index_copy_(0, buf.slots[i], v[:, :, 0].to(pool.dtype))
        return pool.attend_blocks(q, buf.tables[i], positions, self.key_pos, self.valid, reuse_buffers=self.reuse)


class DecodeGraphs:
    def __init__(self, model: EarlyExitLM, pool: KVPool, start: int, stop: int, capture: bool | None = None,
                 pad: bool = True) -> None:
        """pad: round the batch and the table width up to buckets (needed to replay captured graphs; without
        capture, pad=False runs each tick at its exact shape)."""
        self.model, self.pool, self.start, self.stop = model, pool, start, stop
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.pad = pad or self.capture
        (self.scratch,) = pool.allocate(1) if self.pad else (0,)  # padded rows write here (exact shapes: none)
        self._buffers: dict[tuple[int, int], _Buffers] = {}
        self._graphs: dict[tuple[int, int], object] = {}
        self._mempool = torch.cuda.graph_pool_handle() if self.capture else None
        self._built: tuple | None = None  # (key, slots) whose block tables the buffers hold
        self.replays = 0

    def eligible(self, plans) -> bool:
        return bool(plans) and all(
            p.result is None and p.work.start == self.start and p.work.stop == self.stop and p.hidden.shape[1] == 1
            and p.work.fill is None
            and p.item.session.runner.cache.layers == range(self.start, self.stop) for p in plans)

    def run(self, plans) -> Tensor:
        """Hidden states (n, 1, C) after the deep layers for n single-row plans."""
        slots = np.array([p.item.session.runner.cache.slot for p in plans])
        firsts = np.array([p.work.first for p in plans])
        if not (self.pool.tables.lengths[self.start:self.stop, slots] == firsts).all():
            raise CacheError("a decode row does not continue its session's positions")
        return self.step(slots, torch.cat([p.hidden[0] for p in plans]))[:, None].clone()

    def step(self, slots: np.ndarray, hidden: Tensor) -> Tensor:
        """One new row (hidden (n, C)) for each session at `slots`, at its current length, through all deep layers:
        claims the rows' KV slots and returns their hidden states (n, C), a view of a buffer the next step reuses.
        The buffers keep the block tables of the last step's sessions: when `slots` is the same array again, only
        tables that changed since (a session gained a block) are copied."""
        t, bs, lo, hi = self.pool.tables, self.pool.block_size, self.start, self.stop
        n = len(slots)
        pos = t.lengths[lo, slots]
        nb = t.nblocks[lo:hi, slots]
        if not (t.lengths[lo:hi, slots] == pos).all() or not (pos < nb.min(0) * bs).all():
            raise CacheError("a decode row's layers disagree on its position, or it has no block for it; grow() first")
        width = int(nb.max())
        key = (bucket(n), bucket(width, WIDTHS)) if self.pad else (n, width)
        buf = self._buffers.get(key)
        if buf is None:
            if not self.pad:
                self._buffers.clear()
            buf = self._buffers[key] = _Buffers(hi - lo, *key, self.model.config.hidden_size, self.dtype, self.device)
        b, w = key
        changed = t.take_changed()
        if self._built is None or self._built[0] != key or self._built[1] is not slots:
            tables = np.full((hi - lo, b, w), self.scratch, dtype=np.int64)
            tables[:, :n, :width] = t.blocks[lo:hi][:, slots, :width]
            buf.tables.copy_(torch.from_numpy(tables))
            self._built = (key, slots, np.arange(n))
        elif changed:
            rows = np.flatnonzero(np.isin(slots, np.fromiter(changed, dtype=np.int64, count=len(changed))))
            if rows.size:
                sub = t.blocks[lo:hi][:, slots[rows], :width].astype(np.int64)
                buf.tables[:, torch.from_numpy(rows), :width] = torch.from_numpy(sub).to(self.device)
        slot_ids = np.full((hi - lo, b), self.scratch * bs, dtype=np.int64)
        slot_ids[:, :n] = t.blocks[lo:hi][:, slots, pos // bs].astype(np.int64) * bs + pos % bs
        positions = np.zeros(b, dtype=np.int64)
        positions[:n] = pos
        buf.slots.copy_(torch.from_numpy(slot_ids))
        buf.positions.copy_(torch.from_numpy(positions)[:, None])
        buf.lengths.copy_(torch.from_numpy(positions + 1))
        buf.h_in[:n, 0].copy_(hidden)
        if b > n:
            buf.h_in[n:].zero_()
        t.lengths[lo:hi, slots] = pos + 1  # the rows' claims
        if self.capture:
            graph = self._graphs.get(key) or self._record(key, buf)
            graph.replay()
        else:
            self._step(buf)
        self.replays += 1
        return buf.h_out[:n, 0]

    def _step(self, buf: _Buffers) -> None:
        h, positions = buf.h_in, buf.positions
        cos, sin = self.model.rotary(positions, h.dtype)
        view = _StaticAttention(self.pool, buf, self.start, reuse_buffers=not self.capture)
        for layer in range(self.start, self.stop):
            h = self.model.model.layers[str(layer)](h, cos, sin, positions, view)
        buf.h_out.copy_(h)

    def _record(self, key, buf: _Buffers):
        """Warm up on a side stream, then capture (the step is idempotent: it rewrites the same K/V)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(buf)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            self._step(buf)
        self._graphs[key] = graph
        return graph
