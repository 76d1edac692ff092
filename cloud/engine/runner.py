"""The engine's batched runner: one pass over the layers per tick for every scheduled chunk of every session.

Each chunk's depth and catch-up plan comes from its session's LayerRunner (`coexit.decoding.LayerRunner.steps`):
the runner starts every plan, then walks the layers bottom-up; at each layer it packs the rows of all plans whose
current span covers that layer into one ragged batch (B == 1, rows along T), runs the block once with
BatchAttention over the sessions' paged KV, and sends each plan its rows back when its span ends. Final heads are
applied only to chunks that produce a token, all in one matmul, and sampling is batched with per-session
parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from cloud.engine.graphs import DecodeGraphs
from cloud.engine.kv_pool import BatchAttention
from cloud.engine.scheduler import TickItem
from coexit.decoding import LayerWork, RunResult
from coexit.model import EarlyExitLM
from coexit.sampling import sample_batch, top_logprobs


@dataclass
class TokenResult:
    token_id: int
    logprob: float
    exit_layer: int
    logits: Tensor
    top: list[tuple[int, float]] = field(default_factory=list)


class _Plan:
    __slots__ = ("item", "gen", "work", "hidden", "result")

    def __init__(self, item: TickItem) -> None:
        self.item = item
        self.gen = item.session.runner.steps(item.x, item.first, item.decide, item.exits, item.head)
        self.result: RunResult | None = None
        self.advance(None)

    def advance(self, hidden: Tensor | None) -> None:
        try:
            self.work: LayerWork = next(self.gen) if hidden is None else self.gen.send(hidden)
            self.hidden = self.work.hidden
        except StopIteration as done:
            self.result = done.value


class _Packed:
    """The rows of a group of plans packed along T for one or more consecutive layers, with their positions,
    RoPE tables and attention view computed once."""

    def __init__(self, runner: BatchedRunner, group: list[_Plan]) -> None:
        self.group = group
        hs = [p.hidden.to(runner.dtype) for p in group]
        self.h = torch.cat(hs, dim=1) if len(hs) > 1 else hs[0]
        self.positions = torch.cat([torch.arange(p.work.first, p.work.first + p.hidden.shape[1])
                                    for p in group]).to(runner.device)[None]
        self.view = BatchAttention([(p.item.session.runner.cache, p.work.first, p.hidden.shape[1]) for p in group])
        self.cos, self.sin = runner.model.rotary(self.positions, self.h.dtype)

    def unpack(self) -> None:
        row = 0
        for p in self.group:
            n = p.hidden.shape[1]
            p.hidden = self.h[:, row:row + n]
            row += n


class BatchedRunner:
    def __init__(self, model: EarlyExitLM, graphs: DecodeGraphs | None = None) -> None:
        self.model, self.graphs = model, graphs
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def run(self, items: list[TickItem]) -> list[tuple[RunResult, TokenResult | None]]:
        plans = [_Plan(item) for item in items]
        if self.graphs is not None and self.graphs.eligible(plans):  # the steady decode step: static shapes
            for p, h in zip(plans, self.graphs.run(plans)):
                p.advance(h[None])
            return list(zip([p.result for p in plans], self._tokens(plans)))
        live = [p for p in plans if p.result is None]
        layer = min((p.work.start for p in live), default=0)
        packed: _Packed | None = None  # kept across layers while the same plans run the same span
        while live:
            group = [p for p in live if p.work.start <= layer < p.work.stop]
            if group:
                if packed is None or packed.group != group:
                    if packed is not None:
                        packed.unpack()
                    packed = _Packed(self, group)
                packed.h = self.model.model.layers[str(layer)](packed.h, packed.cos, packed.sin, packed.positions,
                                                               packed.view)
                ended = [p for p in group if p.work.stop == layer + 1]
                if ended:
                    packed.unpack()
                    packed = None
                    for p in ended:
                        p.advance(p.hidden)
                    live = [p for p in live if p.result is None]
            layer += 1
        return list(zip([p.result for p in plans], self._tokens(plans)))

    def _tokens(self, plans: list[_Plan]) -> list[TokenResult | None]:
        """Heads for the chunks that produce a token (final logits batched), then batched sampling."""
        due = [p for p in plans if p.item.head]
        out: dict[int, TokenResult] = {}
        if due:
            L = self.model.config.num_hidden_layers
            finals = [p for p in due if p.result.last_hidden is not None]
            if finals:
                logits = self.model.head_logits(L, torch.stack([p.result.last_hidden for p in finals]))
                for p, lg in zip(finals, logits):
                    p.result.logits = lg
            rows = [p.result.logits if p.result.logits is not None else p.result.exit_logits[p.result.depth]
                    for p in due]
            picks = sample_batch(torch.stack(rows), [p.item.segment.sampling for p in due],
                                 [p.item.segment.last for p in due])
            for p, lg, (token, logprob) in zip(due, rows, picks):
                k = p.item.segment.top_k
                out[id(p)] = TokenResult(token, logprob, p.result.depth, lg, top_logprobs(lg, k) if k else [])
        return [out.get(id(p)) for p in plans]
