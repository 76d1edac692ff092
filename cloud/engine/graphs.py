"""Decode-only ticks on static shapes: one step through all deep layers on fixed buffers, captured as a CUDA graph
per (batch-size bucket, block-table width) on a GPU and replayed; run eagerly elsewhere.

A tick qualifies when every chunk is one new row whose plan (`LayerRunner.steps`) is a single span over the whole
deep range: no catch-up rows, no exit checks on the way. That is the steady decode step. The rows are padded to a
batch-size bucket and the block tables to a width bucket; padded rows write into and read from a reserved scratch
block, and their outputs are dropped. Slot ids, tables and lengths are filled from the sessions' PagedCaches with
the same bookkeeping as the general path's `claim`, vectorized over the pool's slot-indexed arrays, so the caches
cannot tell which path ran. The buffers keep the last step's block tables; a step copies only the rows whose
session or tables changed (the scheduler keeps each decode session on the same row from tick to tick).

Shapes: B bucket rows, W table width in blocks, L deep layers, C hidden, K kv heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cloud.engine.kept import KeptGather
from cloud.engine.kv_pool import KVPool
from cloud.engine.staging import RowsAt
from coexit.kv_cache import CacheError
from coexit.model import EarlyExitLM

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
WIDTHS = (4, 8, 16, 32, 64, 128, 256, 512, 1024)


def bucket(n: int, sizes=BATCH_BUCKETS) -> int:
    for b in sizes:
        if b >= n:
            return b
    return 1 << (n - 1).bit_length()


@dataclass
class StepInputs:
    """A prepared static step: its buffers (exact-shape view or bucket), rows and table width, and host arrays."""

    key: tuple[int, int] | None  # bucket (graph key), None at exact shapes
    buf: _Buffers
    n: int
    width: int
    tables: tuple  # see DecodeGraphs._table_update
    slot_ids: np.ndarray  # (L, B) pool slots the rows' k, v go to
    positions: np.ndarray  # (B,)
    sessions: np.ndarray  # (B,) the rows' session (KV) slots, -1 on padded rows


class _Buffers:
    def __init__(self, layers: int, b: int, w: int, c: int, dtype, device) -> None:
        self.h_in = torch.zeros(b, 1, c, dtype=dtype, device=device)
        self.h_out = torch.zeros_like(self.h_in)
        self.positions = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.lengths = torch.ones(b, dtype=torch.long, device=device)
        self.slots = torch.zeros(layers, b, dtype=torch.long, device=device)
        self.tables = torch.zeros(layers, b, w, dtype=torch.long, device=device)

    def view(self, b: int, w: int) -> _Buffers:
        """The first b rows and w table columns (exact shapes inside larger buffers)."""
        v = object.__new__(_Buffers)
        v.h_in, v.h_out, v.positions, v.lengths = self.h_in[:b], self.h_out[:b], self.positions[:b], self.lengths[:b]
        v.slots, v.tables = self.slots[:, :b], self.tables[:, :b, :w]
        return v


class _StaticAttention:
    """The cache view of a static step: per layer, write each row's k, v at its slot, then attend over the blocks
    of its table (keys at positions < its length; `known`: those lengths on the host, as KVPool.decode_mask takes
    them, outside a captured graph)."""

    def __init__(self, pool: KVPool, buf: _Buffers, start: int, reuse_buffers: bool = False,
                 kept: KeptGather | None = None, known: np.ndarray | None = None) -> None:
        self.pool, self.buf, self.start, self.reuse, self.kept = pool, buf, start, reuse_buffers, kept
        self.keys, self.mask = pool.decode_mask(buf.lengths, buf.tables.shape[2], known)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        pool, buf, i = self.pool, self.buf, layer - self.start
        k, v = k[:, :, 0].to(pool.dtype), v[:, :, 0].to(pool.dtype)  # (B, K, D)
        pool.k.index_copy_(0, buf.slots[i], k)
        pool.v.index_copy_(0, buf.slots[i], v)
        if self.kept is not None:
            return self.kept.attend(i, q, k, v, buf.tables[i], self.keys, self.mask)
        return pool.attend_blocks(q, buf.tables[i], self.keys, self.mask, reuse_buffers=self.reuse)


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
        self._buffers: dict[tuple[int, int] | None, _Buffers] = {}  # by bucket (None: exact shapes)
        self._graphs: dict[tuple[int, int], object] = {}
        self._mempool = torch.cuda.graph_pool_handle() if self.capture else None
        self._built: tuple | None = None  # (buffers, slots) whose block tables those buffers hold
        self.kept = KeptGather(pool, stop - start) if not self.capture else None  # see kept.py
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
        claims the rows' KV slots and returns their hidden states (n, C), a view of a buffer the next step reuses."""
        return self.launch(self.prepare(slots), hidden)

    def prepare(self, slots: np.ndarray) -> StepInputs:
        """The host half of a step, on the engine thread: checks, the rows' claims in the pool's tables, and every
        input the device needs as host arrays (nothing on the device is touched, so it may run while an earlier
        step computes). The buffers keep the block tables of the last prepared step's sessions: only rows whose
        session or tables changed since are sent (see `_table_update`)."""
        t, bs, lo, hi = self.pool.tables, self.pool.block_size, self.start, self.stop
        n = len(slots)
        pos = t.lengths[lo, slots]
        nb = t.nblocks[lo:hi, slots]
        if not (t.lengths[lo:hi, slots] == pos).all() or not (pos < nb.min(0) * bs).all():
            raise CacheError("a decode row's layers disagree on its position, or it has no block for it; grow() first")
        width = int(nb.max())
        if self.pad:  # bucketed shapes, one set of buffers (and graph) per bucket
            key = b, w = bucket(n), bucket(width, WIDTHS)
            buf = self._buffers.get(key)
            if buf is None:
                buf = self._buffers[key] = _Buffers(hi - lo, b, w, self.model.config.hidden_size, self.dtype,
                                                    self.device)
            view = buf
        else:  # exact shapes: views of one set of buffers that grows by doubling (a new set starts with no tables)
            key, b = None, n
            buf = self._buffers.get(None)
            if buf is None or buf.h_in.shape[0] < n or buf.tables.shape[2] < width:
                old = (buf.h_in.shape[0], buf.tables.shape[2]) if buf is not None else (0, 0)
                buf = self._buffers[None] = _Buffers(hi - lo, max(n, 2 * old[0]), max(width, 2 * old[1]),
                                                     self.model.config.hidden_size, self.dtype, self.device)
            view = buf.view(n, width)
        tables = self._table_update(buf, slots, width, t.take_changed())
        slot_ids = np.full((hi - lo, b), self.scratch * bs, dtype=np.int64)
        slot_ids[:, :n] = t.blocks[lo:hi][:, slots, pos // bs].astype(np.int64) * bs + pos % bs
        positions = np.zeros(b, dtype=np.int64)
        positions[:n] = pos
        t.lengths[lo:hi, slots] = pos + 1  # the rows' claims
        sessions = np.full(b, -1, dtype=np.int64)
        sessions[:n] = slots
        return StepInputs(key, view, n, width, tables, slot_ids, positions, sessions)

    def launch(self, inp: StepInputs, hidden: Tensor | RowsAt) -> Tensor:
        """The device half: copy a prepared step's inputs into its buffers and run (replay) it; hidden (n, C), or
        the staged rows, copied straight into the step's input. Steps launch in the order they were prepared."""
        buf, n = inp.buf, inp.n
        self.apply_tables(buf, n, inp.width, inp.tables)
        buf.slots.copy_(torch.from_numpy(inp.slot_ids))
        buf.positions.copy_(torch.from_numpy(inp.positions)[:, None])
        buf.lengths.copy_(torch.from_numpy(inp.positions + 1))
        if isinstance(hidden, RowsAt):
            hidden.into(buf.h_in[:n, 0])
        else:
            buf.h_in[:n, 0].copy_(hidden)
        if buf.h_in.shape[0] > n:
            buf.h_in[n:].zero_()
        if self.capture:
            graph = self._graphs.get(inp.key) or self._record(inp.key, buf)
            graph.replay()
        else:
            kept = self.kept
            if kept is not None and not kept.begin(inp.sessions, inp.positions, n, buf.tables.shape[2]):
                kept = None
            try:
                self._step(buf, kept, inp.positions + 1)  # the rows' lengths (padded rows: 1)
            except BaseException:
                if kept is not None:
                    kept.forget()
                raise
        self.replays += 1
        return buf.h_out[:n, 0]

    def _table_update(self, buf: _Buffers, slots: np.ndarray, width: int, changed: set[int]) -> tuple:
        """What brings the buffers' block tables to the sessions at `slots`: only the rows whose slot differs from
        the last step's in the same buffers, or whose tables changed since (`changed`); the rest already hold
        them. Returns ("all", tables (L, n, width)) or ("rows", row indices, their tables, tables of rows past the
        last step's), host copies taken now. Columns past a row's own blocks hold stale but valid ids (masked by
        its length)."""
        t, lo, hi, n = self.pool.tables, self.start, self.stop, len(slots)
        last = self._built[1] if self._built is not None and self._built[0] is buf else np.zeros(0, np.int64)
        self._built = (buf, slots)
        m = min(len(last), n)
        stale = last[:m] != slots[:m]
        if changed:
            dirty = np.zeros(t.capacity, dtype=bool)
            dirty[list(changed)] = True
            stale |= dirty[slots[:m]]
        rows = np.flatnonzero(stale)
        if m == 0 or rows.size > n // 2:  # most of them: one slice
            return ("all", t.blocks[lo:hi][:, slots, :width].astype(np.int64))
        return ("rows", rows, t.blocks[lo:hi][:, slots[rows], :width].astype(np.int64) if rows.size else None,
                t.blocks[lo:hi][:, slots[m:], :width].astype(np.int64) if n > m else None)

    def apply_tables(self, buf: _Buffers, n: int, width: int, update: tuple) -> None:
        """Copy a `_table_update` into the buffers; rows past n in a bucket point at the scratch block. (Also the
        mixed pass's, whose decode rows attend over these buffers' tables.)"""
        if update[0] == "all":
            buf.tables[:, :n, :width] = torch.from_numpy(update[1])
        else:
            _, rows, sub, tail = update
            if sub is not None:
                buf.tables[:, :, :width].index_copy_(1, torch.from_numpy(rows).to(self.device),
                                                     torch.from_numpy(sub).to(self.device))
            if tail is not None:
                buf.tables[:, n - tail.shape[1]:n, :width] = torch.from_numpy(tail)
        if self.pad and buf.tables.shape[1] > n:  # a bucket's padded rows (exact shapes never read past n)
            buf.tables[:, n:] = self.scratch

    def _step(self, buf: _Buffers, kept: KeptGather | None = None, known: np.ndarray | None = None) -> None:
        """The deep layers over the buffers; outside a captured graph, `known` (the rows' lengths on the host)
        trims the keys attended and drops an all-true mask (KVPool.decode_mask)."""
        h, positions = buf.h_in, buf.positions
        cos, sin = self.model.rotary(positions, h.dtype)
        view = _StaticAttention(self.pool, buf, self.start, reuse_buffers=not self.capture, kept=kept, known=known)
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
