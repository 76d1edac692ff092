"""Decode-only ticks on static shapes: one step through all deep layers on fixed buffers, captured as a CUDA graph
per (batch-size bucket, block-table width) on a GPU and replayed; run eagerly elsewhere.

A tick qualifies when every chunk is one new row whose plan (`LayerRunner.steps`) is a single span over the whole
deep range: no catch-up rows, no exit checks on the way. That is the steady decode step. The rows are padded to a
batch-size bucket and the block tables to a width bucket; padded rows write into and read from a reserved scratch
block, and their outputs are dropped. Slot ids, tables and lengths are filled from the sessions' PagedCaches with
the same `claim` bookkeeping the general path uses, so the caches cannot tell which path ran.

Shapes: B bucket rows, W table width in blocks, L deep layers, C hidden, K kv heads, D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cloud.engine.kv_pool import KVPool
from coexit.model import EarlyExitLM

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


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

    def __init__(self, pool: KVPool, buf: _Buffers, start: int) -> None:
        self.pool, self.buf, self.start = pool, buf, start
        self.key_pos, self.valid = pool.block_mask(buf.lengths, buf.tables.shape[2])

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        pool, buf, i = self.pool, self.buf, layer - self.start
        pool.k.index_copy_(0, buf.slots[i], k[:, :, 0].to(pool.dtype))  # (B, K, D)
        pool.v.index_copy_(0, buf.slots[i], v[:, :, 0].to(pool.dtype))
        return pool.attend_blocks(q, buf.tables[i], positions, self.key_pos, self.valid, reuse_buffers=False)


class DecodeGraphs:
    def __init__(self, model: EarlyExitLM, pool: KVPool, start: int, stop: int, capture: bool | None = None) -> None:
        self.model, self.pool, self.start, self.stop = model, pool, start, stop
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        (self.scratch,) = pool.allocate(1)  # padded rows write here
        self._buffers: dict[tuple[int, int], _Buffers] = {}
        self._graphs: dict[tuple[int, int], object] = {}
        self._mempool = torch.cuda.graph_pool_handle() if self.capture else None
        self.replays = 0

    def eligible(self, plans) -> bool:
        return bool(plans) and all(
            p.result is None and p.work.start == self.start and p.work.stop == self.stop and p.hidden.shape[1] == 1
            and p.work.fill is None
            and p.item.session.runner.cache.layers == range(self.start, self.stop) for p in plans)

    def run(self, plans) -> Tensor:
        """Hidden states (n, 1, C) after the deep layers for n single-row plans."""
        n, bs = len(plans), self.pool.block_size
        caches = [p.item.session.runner.cache for p in plans]
        width = max(len(c.tables[layer]) for c in caches for layer in c.layers)
        key = (bucket(n), bucket(width, (4, 8, 16, 32, 64, 128, 256, 512, 1024)))
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = _Buffers(self.stop - self.start, *key, self.model.config.hidden_size,
                                                self.dtype, self.device)
        b, w = key
        firsts = [p.work.first for p in plans]
        slots = [[c.claim(layer, f, 1)[0] for c, f in zip(caches, firsts)] for layer in range(self.start, self.stop)]
        pad_slot, pad_table = self.scratch * bs, [self.scratch] * w
        tables = [[c.tables[layer] + [self.scratch] * (w - len(c.tables[layer])) for c in caches]
                  + [pad_table] * (b - n) for layer in range(self.start, self.stop)]
        buf.slots.copy_(torch.tensor([s + [pad_slot] * (b - n) for s in slots]))
        buf.tables.copy_(torch.tensor(tables))
        buf.positions.copy_(torch.tensor(firsts + [0] * (b - n))[:, None])
        buf.lengths.copy_(torch.tensor([f + 1 for f in firsts] + [1] * (b - n)))
        buf.h_in[:n].copy_(torch.cat([p.hidden[0] for p in plans]).to(self.dtype)[:, None])
        buf.h_in[n:].zero_()
        if self.capture:
            graph = self._graphs.get(key) or self._record(key, buf)
            graph.replay()
        else:
            self._step(buf)
        self.replays += 1
        return buf.h_out[:n].clone()

    def _step(self, buf: _Buffers) -> None:
        h, positions = buf.h_in, buf.positions
        cos, sin = self.model.rotary(positions, h.dtype)
        view = _StaticAttention(self.pool, buf, self.start)
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
