"""The engine's scheduler: each session's queue of uploaded rows, and the choice, each tick, of which rows of
which sessions run, under a row budget, fairly.

An Append becomes a Segment on its session's queue. Each tick every ready session is granted rows max-min fairly
(every session first gets an equal share of the budget, leftovers go to those that want more), one segment per
session per tick, and sessions served this tick move to the back of the round-robin order. A segment longer than
its grant runs as chunks over several ticks (no head, no exit checks), so a 4,000-row prompt cannot stall other
sessions' decode rows; its last chunk carries the exit checks and the token. Rows parked at a cloud exit are
caught up by LayerRunner inside the session's next chunk (they ride with it, outside the grant).

A segment that verifies drafts needs the top hidden state of every row from its first draft's row on: those rows
(its head tail) always run together in its last chunk. A segment with `truncate_to` first forgets the session's
positions from there on (a stateless session's reset, or a Rollback, which carries no rows and is applied, in
queue order, as soon as it reaches the front).

Steady state: when a tick served every ready session with one plain decode row (one row through all deep layers,
a token wanted, no drafts, fill rows, cloud exits or top logprobs), that set of sessions becomes the plan. While
each planned session, and no other, queues exactly one such row before the next tick, `steady()` hands back the
same plan and nothing is re-planned or looped over here. Any other submission, a close or a failure marks the
plan stale, and the next tick is planned from scratch.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from coexit.decoding import Decide
from coexit.sampling import GREEDY, SamplingParams


@dataclass(frozen=True)
class Draft:
    """The edge's proposal for the token at `position` (after row position - 1), with the sparse distribution it
    was drawn from (empty for greedy)."""

    position: int
    token: int
    support_ids: tuple[int, ...] = ()
    support_probs: tuple[float, ...] = ()


@dataclass
class Segment:
    """One Append's rows (hidden (n, C) or token ids (n,)) for positions [first, first + n)."""

    first: int
    rows: Tensor
    want_token: bool
    sampling: SamplingParams = GREEDY
    top_k: int = 0
    truncate_to: int | None = None  # forget positions >= this before the first chunk (stateless reset, rollback)
    drafts: list[Draft] = field(default_factory=list)  # to verify, increasing positions in (first, last]
    fill: Tensor | None = None  # (n,) bool: rows whose deep KV is propagated, not computed
    waiter: Callable[[Any], None] | None = None  # called (engine thread) with a SegmentDone or an exception
    submitted: float = field(default_factory=time.perf_counter)
    done_rows: int = 0
    layer_tokens: int = 0
    rows_filled: int = 0
    compute_s: float = 0.0
    started: float | None = None  # when its first chunk's tick began
    first_tick: int = -1

    @property
    def n(self) -> int:
        return int(self.rows.shape[0])

    @property
    def last(self) -> int:
        return self.first + self.n

    @property
    def head_rows(self) -> int:
        """Newest rows whose top hidden state the segment needs: from its first draft's row on, or the last row
        when it wants a token."""
        if self.drafts:
            return self.last - self.drafts[0].position + 1
        return 1 if self.want_token else 0


@dataclass
class TickItem:
    """A chunk of one session's front segment, scheduled into this tick."""

    session: Any  # cloud.sessions.CloudSession
    segment: Segment
    x: Tensor
    first: int
    final: bool
    decide: Decide | None
    exits: list[int]
    head: int  # newest rows whose top hidden state is needed (0: none)
    fill: Tensor | None = None


def plain_decode(seg: Segment) -> bool:
    """One new row that wants a token and nothing else: the steady decode step."""
    return (seg.n == 1 and seg.want_token and not seg.drafts and seg.fill is None and seg.truncate_to is None
            and seg.top_k == 0)


class SteadyPlan:
    """The sessions of a steady decode tick, in row order, with their KV slots."""

    def __init__(self, sessions: list) -> None:
        self.sessions = sessions
        self.slots = np.array([s.runner.cache.slot for s in sessions], dtype=np.int64)
        self.by_id = {s.id: s for s in sessions}


class Scheduler:
    def __init__(self, row_budget: int = 256) -> None:
        if row_budget < 1:
            raise ValueError(f"row budget must be at least 1, got {row_budget}")
        self.row_budget = row_budget
        self.ready: OrderedDict[str, Any] = OrderedDict()  # sessions with queued segments, round-robin order
        self.steady_start: int | None = None  # first deep layer when steady ticks may reuse a plan (None: never)
        self._plan: SteadyPlan | None = None
        self._fresh = 0  # planned sessions that queued one plain decode row since the last tick
        self._stale = False
        self.steady_ticks = 0  # ticks that reused the plan

    def submit(self, session, segment: Segment) -> None:
        session.queue.append(segment)
        self.ready.setdefault(session.id, session)
        if session.planned and len(session.queue) == 1 and plain_decode(segment):
            self._fresh += 1
        else:
            self._stale = True

    def steady(self) -> SteadyPlan | None:
        """The last plan, when exactly its sessions each queued one plain decode row since the last tick."""
        plan = self._plan
        if plan is None or self._stale or self._fresh != len(plan.sessions):
            return None
        self._fresh = 0
        self.steady_ticks += 1
        return plan

    def invalidate(self) -> None:
        self._stale = True

    def _replan(self, items: list[TickItem] | None) -> None:
        """Forget the plan; make this tick's items the new one when they are a steady decode tick."""
        if self._plan is not None:
            for s in self._plan.sessions:
                s.planned = False
            self._plan = None
        self._fresh, self._stale = 0, False
        if not items or self.steady_start is None or len(items) != len(self.ready):
            return
        for it in items:
            s = it.session
            if (len(s.queue) != 1 or not it.final or not plain_decode(it.segment) or it.decide is not None
                    or s.runner.start != self.steady_start or s.runner.parked or s.unreported_layer_tokens
                    or s.unreported_rows_filled or s.rejected_at is not None):
                return
        self._plan = SteadyPlan([it.session for it in items])
        for s in self._plan.sessions:
            s.planned = True

    def drop(self, session) -> list[Segment]:
        """Remove a session's queued segments (close, eviction, a failed segment); returns them."""
        self._stale = True
        self.ready.pop(session.id, None)
        dropped = list(session.queue)
        session.queue = deque()
        return dropped

    def grants(self, needs: list[int]) -> list[int]:
        """Max-min fair split of the row budget over needs (in round-robin order)."""
        budget, grants = self.row_budget, [0] * len(needs)
        wanting = [i for i, n in enumerate(needs) if n > 0]
        while budget > 0 and wanting:
            share, still = max(1, budget // len(wanting)), []
            for i in wanting:
                g = min(needs[i] - grants[i], share, budget)
                grants[i] += g
                budget -= g
                if grants[i] < needs[i]:
                    still.append(i)
            wanting = still
        return grants

    def next_tick(self, grow: Callable[[Any, int], bool],
                  tick: int) -> tuple[list[TickItem], list[tuple], list[Segment]]:
        """Pick this tick's chunks. grow(session, upto) must make room for positions [0, upto) or say False;
        sessions it refuses come back in the failures list as (session, segment). Rollbacks at the front of a
        queue are applied now and returned as the third list."""
        applied = []
        for s in list(self.ready.values()):
            while s.queue and s.queue[0].n == 0:
                seg = s.queue.popleft()
                s.runner.truncate(seg.truncate_to)
                applied.append(seg)
            if not s.queue:
                self.ready.pop(s.id, None)
        sessions = [s for s in self.ready.values() if s.queue]
        needs = [s.queue[0].n - s.queue[0].done_rows for s in sessions]
        items, failures, now = [], [], time.perf_counter()
        for s, g in zip(sessions, self.grants(needs)):
            if g == 0:
                continue
            seg = s.queue[0]
            left, tail = seg.n - seg.done_rows, seg.head_rows
            if tail > 1:  # the rows to verify run together in the last chunk, even past the grant
                g = left if left <= tail else min(g, left - tail)
            if seg.truncate_to is not None and seg.done_rows == 0:
                s.runner.truncate(seg.truncate_to)
            first = seg.first + seg.done_rows
            if not grow(s, first + g):
                failures.append((s, seg))
                continue
            if seg.started is None:
                seg.started, seg.first_tick = now, tick
            final = seg.done_rows + g == seg.n
            token = final and seg.want_token and not seg.drafts
            policy = s.policy.thresholds if token else {}
            fill = seg.fill[seg.done_rows:seg.done_rows + g] if seg.fill is not None else None
            items.append(TickItem(s, seg, seg.rows[seg.done_rows:seg.done_rows + g], first, final,
                                  s.policy.decide if policy else None, sorted(policy),
                                  seg.head_rows if final else 0, fill))
            seg.done_rows += g
        for item in items:  # served sessions go to the back of the round-robin order
            self.ready.move_to_end(item.session.id)
        self._replan(None if failures or applied else items)
        return items, failures, applied

    def retire(self, item: TickItem) -> None:
        """After the tick: pop a finished segment; a session with nothing left queued leaves the ready set."""
        s = item.session
        if item.final and s.queue and s.queue[0] is item.segment:
            s.queue.popleft()
        if not s.queue:
            self.ready.pop(s.id, None)
