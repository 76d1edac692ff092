"""Mixed ticks: a tick's plain decode rows and its plain prompt chunks through the deep layers in one eager pass.

A plain prompt chunk is rows of hidden states that run straight through the whole deep range: its session has no
parked rows to catch up, the chunk has no exit checks, fill rows or drafts, and at most its last row needs the
final head. Its plan (`LayerRunner.steps`) would be one span over every deep layer, so it needs no plan at all:
its positions, claims and slot ids are computed for all chunks at once from the pool's slot-indexed arrays, as the
static step's are for decode rows (graphs.py). The decode rows' inputs come from `DecodeGraphs.prepare`, so their
block tables stay in the static step's buffers and only changed rows are sent.

The pass packs every row along T (B == 1): the chunks, then the decode rows, or the decode rows first (whichever
lets the chunks staged in the PromptRing be read in place, staging.py). At each layer every row's k, v
is written at its claimed slot; the decode rows attend over their block tables as on the static step, and each
chunk attends causally over its session's prefix (KVPool.attend_prefix, as BatchAttention's multi-row segments
do; a session's first rows over this pass's own keys). The caches cannot
tell which path ran.

Shapes: n decode rows, T chunk rows, N = n + T, L deep layers, W table width, K kv heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cloud.engine.graphs import DecodeGraphs, StepInputs
from cloud.engine.kv_pool import packed_positions
from coexit.attention import attend
from coexit.kv_cache import CacheError


@dataclass
class PromptChunks:
    """Plain prompt chunks prepared on the host: their claims are taken."""

    positions: np.ndarray  # (T,)
    slot_ids: np.ndarray  # (L, T) pool slots their k, v go to
    spans: list[tuple[int, int, int, int]]  # per chunk: (first row in T, rows, and when it continues a session,
    # where the slot ids of its positions [0, first + rows) are in `prefix`: columns [start, stop); else 0, 0)
    prefix: np.ndarray | None  # (L, S): the continuing chunks' slot ids, whole blocks of them (a span may be
    # followed by the unused slots of its last block)


def layout(n: int, t: int, decode_first: bool) -> tuple[int, int]:
    """Where a pass's n decode rows and t chunk rows start in its input: (d0, c0)."""
    return (0, n) if decode_first else (t, 0)


class _MixedAttention:
    """The cache view of a mixed pass (see the module docstring). chunks: PromptChunks.spans, their rows counted
    from row c0; the n decode rows are rows [d0, d0 + n)."""

    def __init__(self, pool, start: int, slots: Tensor, n: int, d0: int, c0: int, buf, width: int, chunks: list,
                 prefix: Tensor | None) -> None:
        self.pool, self.start, self.slots, self.n, self.d0, self.chunks = pool, start, slots, n, d0, chunks
        self.c0 = c0
        self.buf, self.width, self.prefix = buf, width, prefix

    def masks(self) -> None:
        """The decode rows' keys and mask over their tables (device work: at the pass's start)."""
        if self.n:
            self.tables = self.buf.tables[:, :self.n, :self.width]
            self.keys, self.mask = self.pool.decode_mask(self.buf.lengths[:self.n], self.width)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        pool, i, n, d0 = self.pool, layer - self.start, self.n, self.d0
        pool.k.index_copy_(0, self.slots[i], k[0].transpose(0, 1).to(pool.dtype))  # (N, K, D)
        pool.v.index_copy_(0, self.slots[i], v[0].transpose(0, 1).to(pool.dtype))
        pool.writes += 1
        y = torch.empty_like(q)  # (1, H, N, D)
        if n:  # decode rows: whole blocks of their tables, as the static step attends
            qq = q[0, :, d0:d0 + n].transpose(0, 1)[:, :, None]  # (n, H, 1, D)
            out = pool.attend_blocks(qq, self.tables[i], self.keys, self.mask)
            y[0, :, d0:d0 + n] = out[:, :, 0].transpose(0, 1)
        for row, rows, start, stop in self.chunks:  # a chunk: causal attention over its session's prefix
            row += self.c0
            q_rows, q_pos = q[:, :, row:row + rows], positions[:, row:row + rows]
            if stop == 0:  # a session's first rows: its keys are this pass's, as the pool holds them
                kk, vv = (x[:, :, row:row + rows].to(pool.dtype).to(q.dtype) for x in (k, v))
                y[:, :, row:row + rows] = attend(q_rows, kk, vv, q_pos, q_pos)
                continue
            y[:, :, row:row + rows] = pool.attend_prefix(q_rows, self.prefix[i, start:stop], q_pos)
        return y


class MixedStep:
    def __init__(self, graphs: DecodeGraphs) -> None:
        self.graphs, self.pool, self.model = graphs, graphs.pool, graphs.model
        self.start, self.stop = graphs.start, graphs.stop
        self.steps = 0
        self.continued = 0  # chunks that continued a session (first position > 0)

    def eligible(self, item) -> bool:
        """Whether a TickItem is a plain prompt chunk (see the module docstring)."""
        r = item.session.runner
        return (item.decide is None and not item.exits and item.fill is None and not item.segment.drafts
                and item.head <= 1 and r.start == self.start and r.stop == self.stop and not r.parked
                and item.x.is_floating_point() and r.cache.layers == range(self.start, self.stop))

    def prepare(self, slots: np.ndarray, firsts: np.ndarray, ns: np.ndarray) -> PromptChunks:
        """The chunks' checks and claims at every deep layer at once (sessions at `slots`, rows ns from positions
        firsts), and their slot ids."""
        t, bs, lo, hi = self.pool.tables, self.pool.block_size, self.start, self.stop
        ends = firsts + ns
        if (t.lengths[lo:hi, slots] != firsts).any() or (ends > t.nblocks[lo:hi, slots] * bs).any():
            raise CacheError("a prompt chunk does not continue its session's positions at every deep layer, or "
                             "it has no blocks for them; grow() first")
        pos = packed_positions(firsts, ns)
        slot_ids = t.blocks[lo:hi][:, np.repeat(slots, ns), pos // bs].astype(np.int64) * bs + pos % bs
        rows, counts = (np.cumsum(ns) - ns).tolist(), ns.tolist()
        cont, prefix = np.flatnonzero(firsts), None
        starts, stops = np.zeros(len(ns), dtype=np.int64), np.zeros(len(ns), dtype=np.int64)
        if cont.size:  # chunks that continue a session: the slots of all its positions [0, end), in one gather of
            # every block of theirs (each block's first slot + 0..bs-1)
            nb = -(-ends[cont] // bs)
            tables = t.blocks[lo:hi][:, np.repeat(slots[cont], nb), packed_positions(np.zeros_like(nb), nb)]
            prefix = (tables.astype(np.int64)[:, :, None] * bs + np.arange(bs)).reshape(hi - lo, -1)
            starts[cont] = (np.cumsum(nb) - nb) * bs
            stops[cont] = starts[cont] + ends[cont]
            self.continued += cont.size
        t.lengths[lo:hi, slots] = ends  # the claims
        return PromptChunks(pos, slot_ids, list(zip(rows, counts, starts.tolist(), stops.tolist())), prefix)

    def run(self, inp: StepInputs | None, chunks: PromptChunks, hidden: Tensor, decode_first: bool = False
            ) -> Tensor:
        """Prompt chunks and decode rows (prepared by `DecodeGraphs.prepare`, or None): hidden (N, C) at the split,
        the chunks' rows first, or the decode rows' -> (N, C) after the deep layers."""
        g, dev = self.graphs, self.graphs.device
        n, buf, width = 0, None, 0
        slot_ids, positions = chunks.slot_ids, chunks.positions
        if inp is not None:
            n, buf, width = inp.n, inp.buf, inp.width
            g.apply_tables(buf, n, width, inp.tables)
            buf.lengths[:n].copy_(torch.from_numpy(inp.positions[:n] + 1))
            pair = (inp.slot_ids[:, :n], slot_ids), (inp.positions[:n], positions)
            if not decode_first:
                pair = pair[0][::-1], pair[1][::-1]
            slot_ids, positions = np.concatenate(pair[0], axis=1), np.concatenate(pair[1])
        pos = torch.from_numpy(positions).to(dev)[None]  # (1, N)
        prefix = torch.from_numpy(chunks.prefix).to(dev) if chunks.prefix is not None else None
        d0, c0 = layout(n, len(chunks.positions), decode_first)
        view = _MixedAttention(self.pool, self.start, torch.from_numpy(slot_ids).to(dev), n, d0, c0, buf, width,
                               chunks.spans, prefix)
        self.steps += 1
        return self._layers(hidden.to(g.dtype)[None], pos, int(positions.max()) + 1, view)[0]

    def _layers(self, h: Tensor, positions: Tensor, stop: int, view: _MixedAttention) -> Tensor:
        """The device work: RoPE tables and the decode rows' masks, then every deep layer over the packed rows
        h (1, N, C) at positions (1, N), all below `stop`."""
        cos, sin = self.model.rotary.gather(positions, stop, h.dtype)
        view.masks()
        for layer in range(self.start, self.stop):
            h = self.model.model.layers[str(layer)](h, cos, sin, positions, view)
        return h

