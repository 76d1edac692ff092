"""The engine's batched runner: one pass over the layers per tick for every scheduled chunk of every session.

Each chunk's depth and catch-up plan comes from its session's LayerRunner (`coexit.decoding.LayerRunner.steps`):
the runner starts every plan, then walks the layers bottom-up; at each layer it packs the rows of all plans whose
current span covers that layer into one ragged batch (B == 1, rows along T), runs the block once with
BatchAttention over the sessions' paged KV, and sends each plan its rows back when its span ends. Final heads are
applied only to chunks that produce a token or verify drafts, all in one matmul; sampling is batched with
per-session parameters, and drafts get their verdicts from `coexit.sampling.verify_draft`. Fill rows (propagated
KV) are packed with the rest but only store their K/V.

A tick's plain decode rows (`run_steady`: the scheduler's DecodeBatch) skip the plans altogether: they go through
the static step (graphs.py) by KV slot, the final head runs on all of them, and tokens and log-probabilities come
back to the host in one copy and one `.tolist()`. In a tick with plain prompt chunks too (`run_tick`), those chunks
and the decode rows take one mixed pass without plans (mixed.py), one final head and one sampling pass.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cloud.engine.graphs import DecodeGraphs, StepInputs
from cloud.engine.kv_pool import BatchAttention, packed_positions
from cloud.engine.mixed import MixedStep, layout
from cloud.engine.scheduler import TickItem
from cloud.engine.staging import PromptRing, RowsAt
from coexit.decoding import LayerWork, RunResult
from coexit.model import EarlyExitLM
from coexit.sampling import SamplingParams, sample_batch, top_logprobs, verify_draft

_temperature = operator.attrgetter("temperature")


def _drawn(sampling: list[SamplingParams]) -> np.ndarray:
    """Indices of the rows that draw a sample (temperature > 0); the others are greedy."""
    return np.flatnonzero(np.fromiter(map(_temperature, sampling), dtype=np.float64, count=len(sampling)))


class TokenResult:
    """A sampled token. logits (V,) are those it was drawn from; on a steady tick they stay one (n, V) tensor for
    the whole tick and a row is sliced out only when read."""

    __slots__ = ("token_id", "logprob", "exit_layer", "top", "_logits", "_row")

    def __init__(self, token_id: int, logprob: float, exit_layer: int, logits: Tensor,
                 top: list[tuple[int, float]] | None = None, row: int = -1) -> None:
        self.token_id, self.logprob, self.exit_layer = token_id, logprob, exit_layer
        self.top = top if top is not None else []
        self._logits, self._row = logits, row

    @property
    def logits(self) -> Tensor:
        return self._logits if self._row < 0 else self._logits[self._row]

    def __repr__(self) -> str:
        return f"TokenResult({self.token_id}, {self.logprob:.4f}, exit {self.exit_layer})"


@dataclass
class SteadyOutput:
    """A steady tick's results, row by row in its plan's order: host lists from one device-to-host copy."""

    tokens: list[int]
    logprobs: list[float]
    logits: Tensor  # (n, V) on the device
    lengths: np.ndarray  # (n,) each session's length after its row


@dataclass
class SteadyLaunch:
    """A steady tick prepared on the host: the static step's inputs, and the rows that draw a sample (with the
    positions they draw at)."""

    inp: StepInputs
    drawn: np.ndarray
    sampling: list[SamplingParams]  # of the rows in drawn
    positions: list[int]  # of the rows in drawn


@dataclass
class VerdictResult:
    position: int
    accepted: bool
    token_id: int
    logprob: float


class _Plan:
    __slots__ = ("item", "gen", "work", "hidden", "result")

    def __init__(self, item: TickItem) -> None:
        self.item = item
        self.gen = item.session.runner.steps(item.x, item.first, item.decide, item.exits, item.head, item.fill)
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

    def __init__(self, runner: BatchedRunner, group: list[_Plan], stop: int) -> None:
        """stop: the layer where the group next changes (a plan's span ends or another's begins)."""
        self.group = group
        hs = [p.hidden.to(runner.dtype) for p in group]
        self.h = torch.cat(hs, dim=1) if len(hs) > 1 else hs[0]
        firsts = np.fromiter([p.work.first for p in group], dtype=np.int64, count=len(group))
        ns = np.fromiter([p.hidden.shape[1] for p in group], dtype=np.int64, count=len(group))
        self.positions = torch.from_numpy(packed_positions(firsts, ns)).to(runner.device)[None]
        self.fill = None
        if any(p.work.fill is not None for p in group):
            self.fill = torch.cat([p.work.fill if p.work.fill is not None
                                   else torch.zeros(p.hidden.shape[1], dtype=torch.bool) for p in group]).cpu()
        self.view = BatchAttention([(p.item.session.runner.cache, p.work.first, p.hidden.shape[1]) for p in group],
                                   self.fill, stop)
        self.cos, self.sin = runner.model.rotary.gather(self.positions, int((firsts + ns).max()), self.h.dtype)

    def unpack(self) -> None:
        row = 0
        for p in self.group:
            n = p.hidden.shape[1]
            p.hidden = self.h[:, row:row + n]
            row += n


def _copy_rows(h: Tensor, row: int, xs: list[Tensor]) -> None:
    """Copy xs one after the other into h from `row` on (in one call when they are float32, as h is)."""
    if xs and all(x.dtype == h.dtype for x in xs):
        torch.cat(xs, out=h[row:row + sum(x.shape[0] for x in xs)])
        return
    for x in xs:
        h[row:row + x.shape[0]].copy_(x)
        row += x.shape[0]


class BatchedRunner:
    def __init__(self, model: EarlyExitLM, graphs: DecodeGraphs | None = None) -> None:
        self.model, self.graphs = model, graphs
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.stop = model.config.num_hidden_layers
        self.mixed = MixedStep(graphs) if graphs is not None else None

    @torch.no_grad()
    def run(self, items: list[TickItem]) -> list[tuple[RunResult, TokenResult | None, list[VerdictResult]]]:
        plans = [_Plan(item) for item in items]
        if self.graphs is not None and self.graphs.eligible(plans):  # the steady decode step: static shapes
            for p, h in zip(plans, self.graphs.run(plans)):
                p.advance(h[None])
            return self._outputs(plans)
        live = [p for p in plans if p.result is None]
        layer = min((p.work.start for p in live), default=0)
        packed: _Packed | None = None  # kept across layers while the same plans run the same span
        while live:
            group = [p for p in live if p.work.start <= layer < p.work.stop]
            if group:
                if packed is None or packed.group != group:
                    if packed is not None:
                        packed.unpack()
                    stop = min([p.work.stop for p in group] + [p.work.start for p in live if p.work.start > layer])
                    packed = _Packed(self, group, stop)
                packed.h = self.model.model.layers[str(layer)](packed.h, packed.cos, packed.sin, packed.positions,
                                                               packed.view, packed.fill)
                ended = [p for p in group if p.work.stop == layer + 1]
                if ended:
                    packed.unpack()
                    packed = None
                    for p in ended:
                        p.advance(p.hidden)
                    live = [p for p in live if p.result is None]
            layer += 1
        return self._outputs(plans)

    def run_steady(self, slots, rows: RowsAt) -> SteadyOutput:
        """The decode rows of a tick: one row per session (rows, sessions at `slots`) through all deep layers
        on the static step, the final head on every row, then sampling; see `prepare_steady` and
        `compute_steady`."""
        return self.compute_steady(self.prepare_steady(slots, rows), rows)

    def prepare_steady(self, slots, rows: RowsAt) -> SteadyLaunch:
        """The host half (engine thread): the static step's inputs and the rows' claims, and which rows draw a
        sample at which position (the session's length after its row)."""
        inp = self.graphs.prepare(slots)
        drawn = rows.drawn
        positions = (inp.positions[drawn] + 1).tolist() if drawn.size else []
        return SteadyLaunch(inp, drawn, rows.sampling(), positions)

    @torch.no_grad()
    def compute_steady(self, launch: SteadyLaunch, rows: RowsAt) -> SteadyOutput:
        """The device half: the step, the final head on every row, then `_pick`. Touches nothing the engine
        thread writes, so it may run on the device lane while the engine prepares the next tick."""
        h = self.graphs.launch(launch.inp, rows)
        logits = self.model.head_logits(self.stop, h)
        return SteadyOutput(*self._pick(logits, launch.drawn, launch.sampling, launch.positions), logits,
                            launch.inp.positions[:launch.inp.n] + 1)

    @staticmethod
    def _pick(logits: Tensor, drawn: np.ndarray, sampling: list[SamplingParams],
              positions: list[int]) -> tuple[list[int], list[float]]:
        """Tokens and log-probabilities of logits (n, V): greedy rows on the device, each row in `drawn` with its
        own parameters and (seed, position) draw (sampling and positions: of the rows in drawn) as `sample_batch`
        does; they reach the host in one copy and one `.tolist()`."""
        lf = logits.float()
        on_cpu = lf.device.type == "cpu"
        # numpy's argmax keeps torch's rule (the first maximum, NaN first) at a tenth of its time on a CPU
        tokens = torch.from_numpy(lf.numpy().argmax(-1)) if on_cpu else lf.argmax(-1)
        if drawn.size:
            idx = torch.from_numpy(drawn).to(lf.device)
            picks = sample_batch(lf[idx], sampling, positions)
            tokens[idx.to(tokens.device)] = torch.tensor([t for t, _ in picks], device=tokens.device)
        logprobs = torch.log_softmax(lf, -1).gather(1, tokens[:, None])[:, 0]  # as sample_batch computes them
        if on_cpu:
            return tokens.tolist(), logprobs.tolist()
        host = torch.stack([tokens.double(), logprobs.double()]).cpu().tolist()  # the tick's one copy back
        return list(map(int, host[0])), host[1]

    @torch.no_grad()
    def run_tick(self, slots, rows: RowsAt | None, items: list[TickItem], prompts: PromptRing | None = None
                 ) -> tuple[SteadyOutput | None, list[tuple[RunResult, TokenResult | None, list[VerdictResult]]]]:
        """A tick's device work on the engine thread: the decode rows at `slots` (None: none) and the general
        path's items. Plain prompt chunks among the items ride one mixed pass with the decode rows (mixed.py),
        read in place where they lie in `prompts` (the scheduler's PromptRing, or None); the other items take the
        general path (`run`). Returns the decode rows' output and the items' results in their order."""
        for it in items:  # (a decode row the backend left on the host, LocalBackend.segment)
            if it.x.device != self.device:
                it.x = it.x.to(self.device)
        chunks = [it for it in items if self.mixed is not None and self.mixed.eligible(it)]
        if not chunks:
            return (self.run_steady(slots, rows) if slots is not None else None,
                    self.run(items) if items else [])
        out, done = self._run_mixed(slots, rows, chunks, prompts)
        rest = [it for it in items if id(it) not in done]
        general = dict(zip(map(id, rest), self.run(rest))) if rest else {}
        return out, [done[id(it)] if id(it) in done else general[id(it)] for it in items]

    def _run_mixed(self, slots, rows: RowsAt | None, chunks: list[TickItem], prompts: PromptRing | None
                   ) -> tuple[SteadyOutput | None, dict[int, tuple[RunResult, TokenResult | None, list]]]:
        """The decode rows and plain prompt chunks in one pass, one final head over the decode rows and the
        chunks' last rows that want a token, one `_pick`. Returns the decode output and {id(item): result}."""
        inp = self.graphs.prepare(slots) if slots is not None else None
        n, k = (inp.n if inp is not None else 0), len(chunks)
        chunks, x, region, decode_first = self._packed_rows(prompts, rows, chunks)  # (in the input's order)
        try:
            ns = np.fromiter((it.x.shape[0] for it in chunks), dtype=np.int64, count=k)
            firsts = np.fromiter((it.first for it in chunks), dtype=np.int64, count=k)
            prepared = self.mixed.prepare(np.fromiter((it.session.runner.cache.slot for it in chunks),
                                                      dtype=np.int64, count=k), firsts, ns)
            due = [i for i, it in enumerate(chunks) if it.head]
            d0, c0 = layout(n, int(ns.sum()), decode_first)  # first decode row and first chunk row in h
            heads = np.concatenate([d0 + np.arange(n), c0 + np.cumsum(ns)[due] - 1]).astype(np.int64)
            h = self.mixed.run(inp, prepared, x, decode_first)
            logits = self.model.head_logits(self.stop, h.index_select(0, torch.from_numpy(heads).to(h.device)))
        finally:
            if region is not None:  # the pass's input is read (h may be a view of it when no layer computes)
                prompts.release(region)
        params = [chunks[i].segment.sampling for i in due]
        mine = _drawn(params).tolist()  # the chunks' head rows that draw a sample
        drawn, sampling = n + np.array(mine, dtype=np.int64), [params[j] for j in mine]
        drawn_at = [chunks[due[j]].segment.last for j in mine]
        if n:  # the decode rows' draws come first
            drawn = np.concatenate([rows.drawn, drawn])
            sampling, drawn_at = rows.sampling() + sampling, (inp.positions[rows.drawn] + 1).tolist() + drawn_at
        tokens, logprobs = self._pick(logits, drawn, sampling, drawn_at)
        out = SteadyOutput(tokens[:n], logprobs[:n], logits[:n], inp.positions[:n] + 1) if inp is not None else None
        deep, done, counts = self.stop - self.graphs.start, {}, ns.tolist()
        head_of = dict(zip(due, range(n, n + len(due))))  # chunk -> its row in logits
        for i, it in enumerate(chunks):
            res = RunResult(self.stop, False, rows_computed=counts[i] * deep)
            it.session.runner.layer_tokens += res.rows_computed
            j, token, seg = head_of.get(i), None, it.segment
            if j is not None and seg.want_token:  # the row stays in the tick's logits until read
                token = TokenResult(tokens[j], logprobs[j], self.stop, logits,
                                    top_logprobs(logits[j], seg.top_k) if seg.top_k else [], row=j)
            done[id(it)] = (res, token, [])
        return out, done

    @staticmethod
    def _packed_rows(prompts: PromptRing | None, rows: RowsAt | None, chunks: list[TickItem]
                     ) -> tuple[list[TickItem], Tensor, list | None, bool]:
        """The mixed pass's input (T + n, C): the chunks' rows and the n decode rows (copied once out of their
        staging buffer), float32 (every hidden dtype converts to it exactly). Where a run of chunks lies in order
        in the PromptRing it is read in place, and the other rows are copied beside it (`PromptRing.place`);
        else into a new tensor, chunks first. Returns the chunks in the input's order, the input, the ring region
        to give back once the pass has read it (or None), and whether the decode rows come first."""
        n = len(rows) if rows is not None else 0
        placed = prompts.place([it.x for it in chunks], n) if prompts is not None else None
        if placed is None:
            t = sum(it.x.shape[0] for it in chunks)
            h = torch.empty(t + n, chunks[0].x.shape[-1], dtype=torch.float32, device=chunks[0].x.device)
            _copy_rows(h, 0, [it.x for it in chunks])
            if n:
                rows.into(h[t:])
            return chunks, h, None, False
        chunks, h, first = [chunks[i] for i in placed.order], placed.rows, placed.extra_first
        if first:  # decode rows, the copied chunks, then the run read in place
            if n:
                rows.into(h[:n])
            _copy_rows(h, n, [it.x for it in chunks[:len(chunks) - placed.kept]])
        else:  # the run read in place, the copied chunks, then the decode rows
            copied = [it.x for it in chunks[placed.kept:]]
            _copy_rows(h, h.shape[0] - n - sum(x.shape[0] for x in copied), copied)
            if n:
                rows.into(h[h.shape[0] - n:])
        return chunks, h, placed.region, first

    def _outputs(self, plans: list[_Plan]) -> list[tuple[RunResult, TokenResult | None, list[VerdictResult]]]:
        """Final heads for every row that needs one, in one matmul; then verdicts and batched sampling."""
        due = [p for p in plans if p.item.head]
        top: dict[int, Tensor] = {}  # id(plan) -> final logits (k, V) of its head rows
        finals = [p for p in due if p.result.top_hidden is not None]
        if finals:
            logits = self.model.head_logits(self.model.config.num_hidden_layers,
                                            torch.cat([p.result.top_hidden for p in finals]))
            row = 0
            for p in finals:
                k = p.result.top_hidden.shape[0]
                top[id(p)], p.result.logits = logits[row:row + k], logits[row + k - 1]
                row += k
        verdicts = {id(p): self._verdicts(p, top[id(p)]) for p in due if p.item.segment.drafts}
        tokens = self._tokens([p for p in due if p.item.segment.want_token
                               and all(v.accepted for v in verdicts.get(id(p), []))])
        return [(p.result, tokens.get(id(p)), verdicts.get(id(p), [])) for p in plans]

    @staticmethod
    def _verdicts(p: _Plan, logits: Tensor) -> list[VerdictResult]:
        """The full model's verdict on each draft, up to and including the first rejection."""
        seg, out = p.item.segment, []
        base = seg.last - logits.shape[0]  # position of the first head row
        for d in seg.drafts:
            ok, token, logprob = verify_draft(logits[d.position - 1 - base], seg.sampling, d.position, d.token,
                                              list(d.support_ids), list(d.support_probs))
            out.append(VerdictResult(d.position, ok, token, logprob))
            if not ok:
                break
        return out

    def _tokens(self, due: list[_Plan]) -> dict[int, TokenResult]:
        """Batched sampling of the token after each due chunk's last row (its final or cloud-exit logits)."""
        out: dict[int, TokenResult] = {}
        if due:
            rows = [p.result.logits if p.result.logits is not None else p.result.exit_logits[p.result.depth]
                    for p in due]
            picks = sample_batch(torch.stack(rows), [p.item.segment.sampling for p in due],
                                 [p.item.segment.last for p in due])
            for p, lg, (token, logprob) in zip(due, rows, picks):
                k = p.item.segment.top_k
                out[id(p)] = TokenResult(token, logprob, p.result.depth, lg, top_logprobs(lg, k) if k else [])
        return out
