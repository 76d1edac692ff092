"""The engine's scheduler: each session's queue of uploaded rows, and the choice, each tick, of which rows of
which sessions run, under a row budget, fairly.

An Append becomes a Segment on its session's queue. Each tick every ready session is granted rows max-min fairly
(every session first gets an equal share of the budget, leftovers go to those that want more), one segment per
session per tick, and sessions served this tick move to the back of the round-robin order. A segment longer than
its grant runs as chunks over several ticks (no head, no exit checks), so a 4,000-row prompt cannot stall other
sessions' decode rows; its last chunk carries the exit checks and the token. Rows parked at a cloud exit are
caught up by LayerRunner inside the session's next chunk (they ride with it, outside the grant).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from coexit.decoding import Decide
from coexit.sampling import GREEDY, SamplingParams


@dataclass
class Segment:
    """One Append's rows (hidden (n, C) or token ids (n,)) for positions [first, first + n)."""

    first: int
    rows: Tensor
    want_token: bool
    sampling: SamplingParams = GREEDY
    top_k: int = 0
    reset: bool = False  # a stateless session: forget every position before the first chunk
    waiter: Callable[[Any], None] | None = None  # called (engine thread) with a SegmentDone or an exception
    submitted: float = field(default_factory=time.perf_counter)
    done_rows: int = 0
    layer_tokens: int = 0
    compute_s: float = 0.0
    started: float | None = None  # when its first chunk's tick began
    first_tick: int = -1

    @property
    def n(self) -> int:
        return int(self.rows.shape[0])

    @property
    def last(self) -> int:
        return self.first + self.n


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
    head: bool


class Scheduler:
    def __init__(self, row_budget: int = 256) -> None:
        if row_budget < 1:
            raise ValueError(f"row budget must be at least 1, got {row_budget}")
        self.row_budget = row_budget
        self.ready: OrderedDict[str, Any] = OrderedDict()  # sessions with queued segments, round-robin order

    def submit(self, session, segment: Segment) -> None:
        session.queue.append(segment)
        self.ready.setdefault(session.id, session)

    def drop(self, session) -> list[Segment]:
        """Remove a session's queued segments (close, eviction, a failed segment); returns them."""
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

    def next_tick(self, grow: Callable[[Any, int], bool], tick: int) -> tuple[list[TickItem], list[tuple]]:
        """Pick this tick's chunks. grow(session, upto) must make room for positions [0, upto) or say False;
        sessions it refuses come back in the failures list as (session, segment)."""
        sessions = [s for s in self.ready.values() if s.queue]
        needs = [s.queue[0].n - s.queue[0].done_rows for s in sessions]
        items, failures, now = [], [], time.perf_counter()
        for s, g in zip(sessions, self.grants(needs)):
            if g == 0:
                continue
            seg = s.queue[0]
            if seg.reset and seg.done_rows == 0:
                s.runner.truncate(0)
            first = seg.first + seg.done_rows
            if not grow(s, first + g):
                failures.append((s, seg))
                continue
            if seg.started is None:
                seg.started, seg.first_tick = now, tick
            final = seg.done_rows + g == seg.n
            token = final and seg.want_token
            policy = s.policy.thresholds if token else {}
            items.append(TickItem(s, seg, seg.rows[seg.done_rows:seg.done_rows + g], first, final,
                                  s.policy.decide if policy else None, sorted(policy), token))
            seg.done_rows += g
        for item in items:  # served sessions go to the back of the round-robin order
            self.ready.move_to_end(item.session.id)
        return items, failures

    def retire(self, item: TickItem) -> None:
        """After the tick: pop a finished segment; a session with nothing left queued leaves the ready set."""
        s = item.session
        if item.final and s.queue and s.queue[0] is item.segment:
            s.queue.popleft()
        if not s.queue:
            self.ready.pop(s.id, None)
