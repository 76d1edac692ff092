"""Depth-aware decoding over a layer range: early exits with exact KV recomputation, one implementation for the
edge (layers [0, split)) and the cloud (layers [split, L)).

Each position has a depth: how many layers hold its KV. A row that exits at layer e is *parked* at depth e with
its hidden state. Before any row is computed at layer l, every earlier position must have KV at layer l: the
parked rows at depth l are prepended and computed in the same batch (KV recomputation). So a layer's filled
positions are always a prefix, `cache.length(l)`, and the parked rows at depth l are exactly the positions
[cache.length(l), cache.length(l - 1)).

Rows that reach the top of the range (`stop`) are parked there too unless the range ends the model: for the edge
that is the outbox of split-depth hidden states the cloud has not seen yet.

Fill rows (the cloud's approximate KV mode) are positions whose KV is propagated instead of computed: at every
layer of the range their K/V are the layer's projections of the row as given, and the row itself passes through
unchanged (`EarlyExitLM.run_layers(fill=...)`). They count as filled, not computed, layer-rows.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from coexit.kv_cache import KVCache
from coexit.model import EarlyExitLM
from coexit.sampling import GREEDY, sample

# decide(exit_layer, logits (V,), hidden (C,) of the newest row) -> True to stop there
Decide = Callable[[int, Tensor, Tensor], bool]


class _Due:
    """An exit head not applied yet: the newest row's hidden state (C,) at that exit."""

    __slots__ = ("row", "grad")

    def __init__(self, row: Tensor) -> None:
        self.row, self.grad = row, torch.is_grad_enabled()


def checks(decide: Decide | None, layer: int) -> bool:
    """Whether `decide` looks at this exit. A policy's bound decide() answers through the policy's checks()
    (coexit.exits.ExitPolicy); any other callable is asked at every exit; None at none."""
    if decide is None:
        return False
    policy = getattr(decide, "__self__", None)
    return policy.checks(layer) if hasattr(policy, "checks") else True


class HeadSource(Protocol):
    def head_logits(self, layer: int, hidden: Tensor) -> Tensor: ...


class ExitLogits(MutableMapping):
    """{exit layer: logits (V,) of the newest row}, in the order the exits were reached. An exit that no decide()
    looked at keeps only its hidden row and applies its head on first access, so a step computes no LM head
    nobody reads (a prompt chunk, decide=None); an exit decide() checked holds the logits it was shown."""

    def __init__(self, model: HeadSource) -> None:
        self._model = model  # an EarlyExitLM, or the llama.cpp edge's Python heads
        self._d: dict[int, Tensor | _Due] = {}

    def defer(self, layer: int, row: Tensor) -> None:
        self._d[layer] = _Due(row.clone())  # a copy: the caller may reuse the buffer the row lives in

    def is_computed(self, layer: int) -> bool:
        return not isinstance(self._d[layer], _Due)

    def __getitem__(self, layer: int) -> Tensor:
        v = self._d[layer]
        if isinstance(v, _Due):
            with torch.set_grad_enabled(v.grad):
                v = self._d[layer] = self._model.head_logits(layer, v.row)
        return v

    def __setitem__(self, layer: int, logits: Tensor) -> None:
        self._d[layer] = logits

    def __delitem__(self, layer: int) -> None:
        del self._d[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, layer: object) -> bool:
        return layer in self._d

    def __repr__(self) -> str:
        return f"ExitLogits({[(e, 'logits' if self.is_computed(e) else 'due') for e in self._d]})"


@dataclass
class RunResult:
    depth: int  # where the newest row stopped: an exit layer, or the range's stop
    exited: bool  # True when a decide() said stop at `depth` (even if depth == stop)
    # logits (V,) of the newest row at checked exits (LayerRunner: an ExitLogits, computed when first read)
    exit_logits: MutableMapping[int, Tensor] = field(default_factory=dict)
    logits: Tensor | None = None  # final logits (V,) of the newest row when the range ends the model
    rows_computed: int = 0  # layer-row computations (layer-tokens) this call performed
    last_hidden: Tensor | None = None  # newest row's hidden (C,) at the top when the final head is due
    top_hidden: Tensor | None = None  # the newest `head` rows' hidden (head, C) at the top (verification)
    rows_filled: int = 0  # layer-rows whose KV was propagated (fill rows), not computed


@dataclass
class LayerWork:
    """One span of a run: compute layers [start, stop) on hidden (1, T, C) holding positions [first, first + T)."""

    start: int
    stop: int
    hidden: Tensor
    first: int
    fill: Tensor | None = None  # (T,) bool: rows whose KV is propagated, not computed


class ParkedRows(dict):
    """depth -> (first position, rows (n, C)): rows that stopped at that depth and wait to catch up, contiguous in
    position per depth (the invariant every runner of exits keeps: coexit's LayerRunner, the llama.cpp edge)."""

    def add(self, depth: int, first: int, rows: Tensor) -> None:
        if depth in self:
            f0, r0 = self[depth]
            assert f0 + r0.shape[0] == first, "parked rows must stay contiguous"
            first, rows = f0, torch.cat([r0, rows], 0)
        self[depth] = (first, rows)

    def truncate(self, length: int) -> None:
        """Forget rows of positions >= length."""
        for d in list(self):
            first, rows = self[d]
            if first >= length:
                del self[d]
            else:
                self[d] = (first, rows[: length - first])


class LayerRunner:
    """Runs layers [start, stop) of `model` for one sequence, letting rows stop at exit layers."""

    def __init__(self, model: EarlyExitLM, start: int, stop: int, cache: KVCache | None = None,
                 max_len: int | None = None) -> None:
        self.model, self.start, self.stop = model, start, stop
        self.cache = cache or model.new_cache(max_len=max_len, layers=range(start, stop))
        self.ends_model = stop == model.config.num_hidden_layers
        self.parked = ParkedRows()  # hidden rows parked at each depth
        self.layer_tokens = 0  # total layer-row computations so far

    # ---- bookkeeping ---------------------------------------------------------------------------------------
    @property
    def next_position(self) -> int:
        """First position this runner has not seen at all."""
        top = max((first + rows.shape[0] for first, rows in self.parked.values()), default=0)
        return max(top, self.cache.length(self.start))

    def park(self, rows: Tensor, first: int) -> None:
        """Accept rows (n, C) at depth `start` without computing them yet (they catch up with the next run)."""
        self._check_first(first)
        self.parked.add(self.start, first, rows)

    def _check_first(self, first: int) -> None:
        if first != self.next_position:
            raise ValueError(f"rows start at position {first} but this runner expects position "
                             f"{self.next_position}; positions must continue without gap or overlap")

    def take_top(self) -> tuple[int, Tensor]:
        """Remove and return (first position, rows) parked at depth `stop` (the edge's upload outbox)."""
        first, rows = self.parked.pop(self.stop, (self.cache.length(self.stop - 1), None))
        if rows is None:
            return first, torch.zeros(0, self.model.config.hidden_size)
        return first, rows

    # ---- compute -------------------------------------------------------------------------------------------
    def steps(self, x: Tensor, first: int, decide: Decide | None = None, exits: list[int] | None = None,
              head: int = 1, fill: Tensor | None = None,
              to_stop: bool = False) -> Generator[LayerWork, Tensor, RunResult]:
        """The depth/catch-up plan of one run, as a generator: it yields the layer spans to compute (rows with
        their first position, catch-up rows prepended) and is sent back the hidden states after each span. Its
        return value is the RunResult. `run` drives it over this runner's own cache; the cloud engine drives many
        at once, one batched pass over the layers for all of them.

        x is token ids (T,) when start == 0, else hidden states (T, C) at depth `start`. Exit heads in `exits`
        (default: every exit in (start, stop]) are evaluated on the newest row in order; the first one that
        `decide` accepts stops the rows there (parked at that depth). Without `decide`, rows run to `stop` and no
        head is applied until its logits are read from RunResult.exit_logits (see ExitLogits). With
        to_stop the accepted exit is only recorded (RunResult.depth, .exited; later exits are not checked) and the
        rows still run to `stop`: a draft that still needs its split row. head is how many of the newest rows
        need their top hidden state (RunResult.top_hidden; .last_hidden is the newest): 0 for a chunk of a longer
        upload, more than 1 to verify drafts. fill (T,) bool marks fill rows (see the module docstring).
        """
        self._check_first(first)
        if fill is not None and decide is not None and not to_stop:
            raise ValueError("fill rows cannot stop at an exit: their KV is propagated through the whole range")
        model = self.model
        if self.start == 0 and not x.is_floating_point():
            x = model.embed(x[None, :].long())[0]
        h = x[None]  # (1, T, C)
        lo = first  # first position of the rows in h
        check = [e for e in (exits if exits is not None else model.config.exit_layers) if self.start < e <= self.stop]
        result = RunResult(depth=self.stop, exited=False, exit_logits=ExitLogits(model))
        layer = self.start
        while layer < self.stop:
            if layer in self.parked:  # catch up rows parked at this depth (KV recomputation)
                pf, prow = self.parked.pop(layer)
                assert pf + prow.shape[0] == lo, "parked rows must end where the batch begins"
                h, lo = torch.cat([prow[None].to(h.dtype), h], 1), pf
                if fill is not None:
                    fill = torch.cat([torch.zeros(prow.shape[0], dtype=torch.bool, device=fill.device), fill])
            # run up to the next place something happens: an exit check, parked rows, or the top
            nxt = min([b for b in (*check, *self.parked) if b > layer] + [self.stop])
            h = yield LayerWork(layer, nxt, h, lo, fill)
            filled = int(fill.sum()) if fill is not None else 0
            self.layer_tokens += (h.shape[1] - filled) * (nxt - layer)
            result.rows_computed += (h.shape[1] - filled) * (nxt - layer)
            result.rows_filled += filled * (nxt - layer)
            layer = nxt
            if layer in check and layer < model.config.num_hidden_layers:
                if not checks(decide, layer):  # nobody decides here: the head is applied only if its logits are read
                    result.exit_logits.defer(layer, h[0, -1])
                    continue
                logits = model.head_logits(layer, h[0, -1])
                result.exit_logits[layer] = logits
                if decide(layer, logits, h[0, -1]):
                    result.depth, result.exited = layer, True
                    if to_stop:
                        check = []
                        continue
                    if layer < self.stop or not self.ends_model:
                        self.parked.add(layer, lo, h[0])
                    return result
        if not self.ends_model:
            self.parked.add(self.stop, lo, h[0])
        elif head:
            result.last_hidden = h[0, -1]
            result.top_hidden = h[0, -head:]
        return result

    @torch.no_grad()
    def run(self, x: Tensor, first: int, decide: Decide | None = None, exits: list[int] | None = None,
            head: int = 1, fill: Tensor | None = None, to_stop: bool = False) -> RunResult:
        """Advance new rows for positions [first, first + T) through the range (see `steps`), computing on this
        runner's cache; when the range ends the model, RunResult.logits are the newest row's final logits."""
        plan = self.steps(x, first, decide, exits, head, fill, to_stop)
        try:
            work = next(plan)
            while True:
                out = self.model.run_layers(work.hidden, work.first, self.cache, work.start, work.stop, fill=work.fill)
                work = plan.send(out.hidden)
        except StopIteration as done:
            result = done.value
        if result.last_hidden is not None:
            result.logits = self.model.head_logits(self.stop, result.last_hidden)
        return result

    def truncate(self, length: int) -> None:
        """Forget positions >= length (rollback)."""
        self.cache.truncate(length)
        self.parked.truncate(length)


@torch.no_grad()
def generate_full(model: EarlyExitLM, prompt_ids: list[int], max_new_tokens: int, sampling=None,
                  stop_id: int | None = None) -> list[int]:
    """Reference decoding with the whole model and its KV cache (what cloud-only serving computes)."""
    sampling = sampling or GREEDY
    cache = model.new_cache(max_len=len(prompt_ids) + max_new_tokens)
    x, out, pos = torch.tensor([prompt_ids]), [], len(prompt_ids)
    for _ in range(max_new_tokens):
        logits = model(x, cache=cache, head_rows="last").logits[0, -1]
        token, _ = sample(logits, sampling, position=pos)
        out.append(token)
        if token == stop_id:
            break
        x, pos = torch.tensor([[token]]), pos + 1
    return out
