"""The engine's scheduler: each session's queue of uploaded rows, and the choice, each tick, of which rows of
which sessions run, under a row budget, fairly.

An Append becomes a Segment on its session's queue. Each tick grants rows under a row budget, one segment per
session per tick (`grants`): every ready session first gets up to an equal share of the budget, in round-robin
order (sessions served this tick move to the back), so a decode row or a few drafts are served at once; prompts
(segments that fit the budget) wanting more are then served whole, first come, first served, with what is left, and
only the last one served may be cut: first those of sessions under way that wait for a token (rows that exited on
the edge, drafts to verify), then new sessions' prompts and uploads that want nothing back; whatever is left after
them is split max-min fairly over the longer uploads. (Plain decode rows are split apart, and the others may take
up to half a tick from them: see "Decode rows apart" below; with more sessions wanting rows than the rows there
are, "A burst".) A segment longer than its grant runs as chunks over several ticks (no head, no exit checks), so a
4,000-row prompt cannot stall other sessions' decode rows, nor the prompts queued after it; its last chunk carries
the exit checks and the token. Rows parked at a cloud exit are caught up by LayerRunner inside the session's next
chunk (they ride with it, outside the grant).

Why first come, first served among prompts rather than an equal split (vLLM's chunked prefill does the same): a
tick computes as many rows either way, but the prompts queued first are answered sooner instead of all near the
end (a short prompt queued behind long ones waits for them, where an equal split would serve it sooner), and
each tick's prompt chunks are the ones queued one after the other, so a mixed pass reads them in place in the
PromptRing.

A segment that verifies drafts needs the top hidden state of every row from its first draft's row on: those rows
(its head tail) always run together in its last chunk. A segment with `truncate_to` first forgets the session's
positions from there on (a stateless session's reset, or a Rollback, which carries no rows and is applied, in
queue order, as soon as it reaches the front).

Decode rows apart: a ready session whose whole queue is one plain decode row (one row through all deep layers, a
token wanted, no drafts, fill rows, cloud exits or top logprobs) is kept in `plain` as it is submitted, and its row
is staged at the session's KV slot (staging.py), so a tick gathers its decode rows by slot. Such a row
needs one row of budget, which the first round of the fair split grants whenever the ready sessions fit the budget,
so `next_tick` hands them to the engine's static step as one DecodeBatch (their blocks grown in one allocation)
and runs the fair split over the other sessions only, with the first round's share the whole set would have had:
while the others' rows fit what the decode rows leave, the grants are the same as splitting over everyone. The
others may take up to half the rows, though, if the decode rows leave less (and, with more sessions ready than
rows, split among themselves as above): the plain decode rows then take turns on the static step in the rest, in
round-robin order (served sessions rejoin at the back), instead of every row falling to the general path. So a
prompt joining a full house is answered in a tick or two, whether the decode sessions number just under the
budget or past it; with only what they leave, a 128-row prompt beside 254 decoding sessions under a budget of 256
waited 64 ticks (two rows a tick), against 1 tick beside 256 (see also bench/burst.py's "one every 4 ticks").

A burst: more sessions wanting rows than the rows there are (clients reconnecting to a replica, each replaying its
history). An equal split then gives one row each in turn, so every prompt of the burst is answered at about the
same late tick, most of them past their clients' deadlines (bench/burst.py). So all but an eighth of the rows go
first come, first served in the same order as above, longer uploads included, and the last eighth one row each,
in round-robin order, to the sessions not served, so that every session moves.

Prompt rows: any other upload of 2 to `row_budget` float32 rows on a CPU is copied, as it is queued, into the
PromptRing (staging.py), where a mixed tick reads its chunks in place; its region is given back when the segment is
popped or dropped, or, for a session dropped while a tick reads it, when that tick lands.

Steady state: when a tick served every ready session with one plain decode row, that set of sessions becomes the
plan. While each planned session, and no other, queues exactly one such row before the next tick, `steady()` hands
back the same plan and nothing is re-planned or looped over here. Any other submission, a close or a failure marks
the plan stale.
"""

from __future__ import annotations

import itertools
import operator
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from cloud.engine.staging import PromptRing, StagedRows
from coexit.decoding import Decide
from coexit.sampling import GREEDY, SamplingParams

_slot, _id = operator.attrgetter("runner.cache.slot"), operator.attrgetter("id")


@dataclass(frozen=True)
class Draft:
    """The edge's proposal for the token at `position` (after row position - 1), with the sparse distribution it
    was drawn from (empty for greedy)."""

    position: int
    token: int
    support_ids: tuple[int, ...] = ()
    support_probs: tuple[float, ...] = ()


@dataclass(slots=True)
class Segment:
    """One Append's rows (hidden (n, C) or token ids (n,)) for positions [first, first + n)."""

    first: int
    rows: Tensor
    want_token: bool
    sampling: SamplingParams = GREEDY
    top_k: int = 0
    truncate_to: int | None = None  # forget positions >= this before the first chunk (stateless reset, rollback)
    drafts: list[Draft] | tuple = ()  # to verify, increasing positions in (first, last] (an empty tuple: none,
    # and no list for the cyclic GC to track on every decode row)
    fill: Tensor | None = None  # (n,) bool: rows whose deep KV is propagated, not computed
    waiter: Callable[[Any], None] | None = None  # called (engine thread) with a SegmentDone or an exception
    submitted: float = field(default_factory=time.perf_counter)
    done_rows: int = 0
    layer_tokens: int = 0
    rows_filled: int = 0
    compute_s: float = 0.0
    started: float | None = None  # when its first chunk's tick began
    first_tick: int = -1
    staged: list | None = None  # its rows' region in the scheduler's PromptRing, until popped or dropped
    arrival: int = -1  # the scheduler's count of segments queued before it (its turn among prompts)
    n: int = field(init=False, default=0)  # rows (read several times per Append: kept, not looked up)

    def __post_init__(self) -> None:
        self.n = int(self.rows.shape[0])

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


def turn(seg: Segment) -> tuple[bool, int]:
    """The segment's place in first come, first served order (`grants`): sessions under way that wait for a token
    or verdicts (rows that exited on the edge, caught up with the next one; drafts to verify) go before the rest
    (new sessions' prompts; uploads that want nothing back yet, which no client waits on, so a client cannot jump
    the queue by sending a long prompt as several Appends), each in the order they were queued."""
    return seg.first == 0 or not (seg.want_token or seg.drafts), seg.arrival


def prompt_turn(seg: Segment, row_budget: int) -> tuple[bool, int] | None:
    """The segment's turn among the prompts served first come, first served past the fair share (`grants`), or
    None for an upload longer than the row budget (split max-min)."""
    return None if seg.n > row_budget else turn(seg)


class DecodeBatch:
    """Sessions that each run one plain decode row this tick on the static step, in row order, with their KV
    slots (the steady plan is one, reused while nothing changes). A tick's batch is made from the last one
    (`successor`), changed only where sessions came or went."""

    def __init__(self, sessions: list) -> None:
        self.sessions = sessions
        self.slots = np.fromiter(map(_slot, sessions), dtype=np.int64, count=len(sessions))
        self.by_id = dict(zip(map(_id, sessions), sessions))
        self.row_of = dict(zip(self.by_id, range(len(sessions))))  # session id -> its row

    def successor(self, plain: dict) -> DecodeBatch:
        """The batch of the sessions in `plain`: each keeps its row here, new ones (in id order, the same on every
        tensor-parallel rank) fill the rows of those that left, then the end; rows still open are filled from the
        end (the static step's buffers keep the block tables of rows whose session stays). Its Python loops run
        over the sessions that came and went; finding them (two set differences) and copying the batch's lists are
        C-level passes over the whole batch."""
        gone, new = self.by_id.keys() - plain.keys(), plain.keys() - self.by_id.keys()
        if not gone and not new:
            return self
        b = object.__new__(DecodeBatch)
        rows, slots, by_id, row_of = list(self.sessions), self.slots.copy(), dict(self.by_id), dict(self.row_of)
        holes = sorted(row_of.pop(sid) for sid in gone)
        for sid in gone:
            del by_id[sid]
        added = sorted(new)
        tail = len(added) - len(holes)
        if tail > 0:
            rows += [None] * tail
            slots = np.concatenate([slots, np.zeros(tail, dtype=np.int64)])
            holes += range(len(rows) - tail, len(rows))
        for i, sid in zip(holes, added):
            s = rows[i] = by_id[sid] = plain[sid]
            slots[i], row_of[sid] = s.runner.cache.slot, i
        for i in holes[len(added):]:  # rows left open: the last rows move into them
            rows[i] = None
        n = len(rows)
        for i in holes[len(added):]:
            while n and rows[n - 1] is None:
                n -= 1
            if i >= n:
                break
            s = rows[i] = rows[n - 1]
            rows[n - 1] = None
            slots[i], row_of[s.id] = slots[n - 1], i
            n -= 1
        while n and rows[n - 1] is None:
            n -= 1
        b.sessions, b.slots, b.by_id, b.row_of = rows[:n], slots[:n], by_id, row_of
        return b


class Scheduler:
    def __init__(self, row_budget: int = 256) -> None:
        if row_budget < 1:
            raise ValueError(f"row budget must be at least 1, got {row_budget}")
        self.row_budget = row_budget
        self.ready: OrderedDict[str, Any] = OrderedDict()  # sessions with queued segments, round-robin order
        self.plain: dict[str, Any] = {}  # ready sessions whose queue is one plain decode row for the static step
        self.staged = StagedRows()  # the plain sessions' rows, by KV slot
        self.prompts: PromptRing | None = PromptRing(8 * row_budget)  # the other rows (a prompt's), back to back,
        # on a CPU (None: not staged; Engine.lockstep)
        self.steady_start: int | None = None  # first deep layer of the static step (None: no static step)
        self._rollbacks: set[str] = set()  # sessions that queued a Rollback not applied yet
        self._arrivals = 0  # segments queued so far
        self._plan: DecodeBatch | None = None
        self._batch: DecodeBatch | None = None  # the last decode batch
        self._fresh = 0  # planned sessions that queued one plain decode row since the last tick
        self._stale = False
        self.busy: dict[str, Any] = {}  # sessions of a tick still on the device lane: not scheduled until settled
        self.flying: dict[int, list[dict]] = {}  # tick -> the sessions riding it, as dicts by id (`in_flight`)
        self._landing: dict[int, list] = {}  # tick -> PromptRing regions of segments dropped while it ran
        self.steady_ticks = 0  # ticks that reused the plan
        self.mixed_ticks = 0  # ticks with decode rows on the static step beside the general path's chunks
        self.over_budget_ticks = 0  # ticks with more sessions ready than the row budget (sessions took turns)
        self.deferred_decode_rows = 0  # plain decode rows left for a later tick for want of rows

    def eligible(self, session) -> bool:
        """Whether the session's rows may take the static step: hidden rows over the whole deep range, no cloud
        exits or parked rows, nothing left to report, no rejected draft."""
        return (session.runner.start == self.steady_start and not session.policy.thresholds
                and not session.runner.parked and not session.unreported_layer_tokens
                and not session.unreported_rows_filled and session.rejected_at is None)

    def _plain(self, session) -> bool:
        """Whether all the session has queued is one plain decode row it may run on the static step."""
        q = session.queue
        return len(q) == 1 and self.steady_start is not None and plain_decode(q[0]) and self.eligible(session)

    def submit(self, session, segment: Segment) -> None:
        self.submit_many(((session, segment),))

    def submit_many(self, items) -> None:
        """Queue (session, segment) pairs, in order (a front end's message of Appends: one pass). A session whose
        whole queue becomes one plain decode row joins `plain`, its row staged by KV slot (all of them at once)."""
        ready, plain, busy, prompts = self.ready, self.plain, self.busy, self.prompts
        staged, arrivals, stale = [], self._arrivals, False
        for session, segment in items:
            sid, queue, n = session.id, session.queue, segment.n
            # rows a mixed tick may read in place (a longer upload is cut into chunks anyway, and its copy would
            # hold the engine lock)
            if prompts is not None and 1 < n <= self.row_budget and segment.rows.is_floating_point():
                put = prompts.stage(segment.rows)
                if put is not None:
                    segment.rows, segment.staged = put
            segment.arrival, arrivals = arrivals, arrivals + 1
            queue.append(segment)
            if segment.truncate_to is not None and n == 0:
                self._rollbacks.add(sid)
            if sid in busy:  # its tick is on the device: it becomes ready again when that tick settles
                stale = True
                continue
            if sid not in ready:
                ready[sid] = session
            if self._plain(session):
                plain[sid] = session
                staged.append((session.runner.cache.slot, segment))
                if session.planned:
                    self._fresh += 1
                    continue
            else:
                plain.pop(sid, None)
            stale = True
        self._arrivals = arrivals
        if stale:
            self._stale = True
        if staged:
            self.staged.put_many(staged)

    def settled(self, session) -> None:
        """After a tick popped the session's finished segment: it leaves the ready set when nothing is left,
        and becomes a plain decode session when all that is left is one plain decode row."""
        if not session.queue:
            self.ready.pop(session.id, None)
            self.plain.pop(session.id, None)
        elif self._plain(session):
            self.plain[session.id] = session
            self.staged.put(session.runner.cache.slot, session.queue[0])
        else:
            self.plain.pop(session.id, None)

    def hold(self, sessions: list) -> None:
        """Sessions whose tick was handed to the device lane (an overlapped tick): out of the ready set until
        `unhold`, so the ticks prepared meanwhile leave them alone."""
        for s in sessions:
            self.busy[s.id] = s
            self.ready.pop(s.id, None)
            self.plain.pop(s.id, None)

    def unhold(self, session) -> None:
        """After an overlapped tick popped the session's finished segment: ready again if more is queued."""
        if self.busy.pop(session.id, None) is not None and session.queue:
            self.ready[session.id] = session
            self._stale = True
            self.settled(session)

    def in_flight(self, session) -> bool:
        """Whether the session rides a tick not settled yet (its blocks may be neither freed nor evicted). A tick's
        decode batch is registered whole (its own dict by id), so marking it costs no pass over its sessions."""
        return bool(self.riding(session))

    def riding(self, session) -> list[int]:
        """The ticks not settled yet that the session rides."""
        sid = session.id
        return [tick for tick, groups in self.flying.items() if any(sid in group for group in groups)]

    def fly(self, tick: int, group: dict) -> None:
        """The sessions of `group` (by id) ride tick `tick` until `landed(tick)`."""
        self.flying.setdefault(tick, []).append(group)

    def landed(self, tick: int) -> None:
        self.flying.pop(tick, None)
        for region in self._landing.pop(tick, ()):
            self.prompts.release(region)

    def steady(self) -> DecodeBatch | None:
        """The last plan, when exactly its sessions each queued one plain decode row since the last tick."""
        plan = self._plan
        if plan is None or self._stale or self.busy or self._fresh != len(plan.sessions):
            return None
        self._fresh = 0
        self.steady_ticks += 1
        return plan

    def invalidate(self) -> None:
        self._stale = True

    def _replan(self, items: DecodeBatch | None) -> None:
        """Forget the plan; make this tick's decode batch the new one when it is the whole tick."""
        if self._plan is not None:
            for s in self._plan.sessions:
                s.planned = False
            self._plan = None
        self._fresh, self._stale = 0, False
        if items is None or len(items.sessions) != len(self.ready):
            return
        self._plan = items
        for s in items.sessions:
            s.planned = True

    def drop(self, session) -> list[Segment]:
        """Remove a session's queued segments (close, eviction, a failed segment); returns them."""
        self._stale = True
        self.ready.pop(session.id, None)
        self.plain.pop(session.id, None)
        self.busy.pop(session.id, None)
        self._rollbacks.discard(session.id)
        dropped = list(session.queue)
        session.queue = deque()
        for seg in dropped:
            self.release_rows(seg, session)
        return dropped

    def release_rows(self, seg: Segment, session=None) -> None:
        """A segment's rows are read no more: give their region of the PromptRing back (once); when `session`
        rides a tick (its front segment's rows may be being read), when the last such tick lands."""
        if seg.staged is None:
            return
        ticks = self.riding(session) if session is not None else ()
        if ticks:
            self._landing.setdefault(max(ticks), []).append(seg.staged)
        else:
            self.prompts.release(seg.staged)
        seg.staged = None

    def grants(self, needs: list[int], budget: int | None = None, share: int | None = None,
               turns: list | None = None, order: list | None = None) -> list[int]:
        """Split the row budget (or `budget`) over needs (in round-robin order). Round one gives every session up
        to the share (`share`, or an equal split of the budget over the sessions that want rows), in round-robin
        order; then the prompts (a session whose `turns` entry is not None: a segment that fits the row budget)
        that want more than the share get nothing in round one and are served in full, in the order of their
        turns, with what is left (first come, first served: only the last one served may be cut); whatever is
        left after them is split max-min fairly over the rest (longer uploads).

        With more sessions wanting rows than the budget has (a burst: round one cannot serve them all), all but an
        eighth of the rows go first come, first served over every session in the order of `order` (each
        session's `turn`, longer uploads included), and the last eighth one row each, in round-robin order, to
        the sessions not served, so that every session moves. (Without `order`, the round-robin order alone
        decides.) One row each would have every prompt of the burst answered at about the same late tick
        (bench/burst.py)."""
        budget, grants = self.row_budget if budget is None else budget, [0] * len(needs)
        wanting = [i for i, n in enumerate(needs) if n > 0]
        if not wanting:
            return grants
        if order is not None and len(wanting) > budget:
            budget -= self._first_come(needs, order, budget - max(1, budget // 8), grants, wanting)
            rest = [i for i in wanting if grants[i] == 0]
            for i, g in zip(rest, self.grants([needs[i] for i in rest], budget)):
                grants[i] = g
            return grants
        share, queue, still = share or max(1, budget // len(wanting)), [], []
        first_come = turns is not None and len(wanting) * share <= budget
        for i in wanting:
            if first_come and turns[i] is not None and needs[i] > share:
                queue.append(i)
                continue
            grants[i] = g = min(needs[i], share, budget)
            budget -= g
            if g < needs[i]:
                still.append(i)
        if queue:
            budget -= self._first_come(needs, turns, budget, grants, queue)
        wanting = still
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

    @staticmethod
    def _first_come(needs: list[int], turns: list, budget: int, grants: list[int], queue: list[int]) -> int:
        """Grant the sessions at `queue` their needs in full, in the order of their turns, while `budget` lasts
        (only the last one served is cut); returns the rows granted."""
        left = budget
        for i in sorted(queue, key=turns.__getitem__):
            if left <= 0:
                break
            grants[i] = g = min(needs[i], left)
            left -= g
        return budget - left

    def next_tick(self, grow: Callable[[Any, int], bool], tick: int,
                  grow_rows: Callable[[np.ndarray], bool] | None = None,
                  grow_many: Callable[[list, list[int]], bool] | None = None
                  ) -> tuple[list[TickItem], DecodeBatch | None, list[tuple], list[Segment]]:
        """Pick this tick's work. grow(session, upto) must make room for positions [0, upto) or say False;
        grow_rows(slots), when given, makes room for one more position of every session at `slots` at once or says False
        (they then grow one by one); grow_many(sessions, uptos), when given, does the same for the general path's
        chunks, all at once, or says False (they then grow one by one, in round-robin order). Returns the chunks of the
        general path, the plain decode rows for the static step (a DecodeBatch, or None), the refused (session, segment)
        pairs, and the Rollbacks that reached the front of their queue, applied now. A session rides the tick (`fly`)
        as soon as it has its blocks, so that no later session's grow evicts it.
        """
        applied, riding = [], {}  # riding: the tick's sessions that have their blocks, besides a decode batch
        self.fly(tick, riding)
        for sid in list(self._rollbacks):
            if sid in self.busy:  # applied once its tick settles
                continue
            s = self.ready.get(sid)
            while s is not None and s.queue and s.queue[0].n == 0:
                seg = s.queue.popleft()
                s.runner.truncate(seg.truncate_to)
                applied.append(seg)
            if s is None or not any(seg.n == 0 for seg in s.queue):
                self._rollbacks.discard(sid)
            if s is not None:
                self.settled(s)
        k, plain, ready, budget = len(self.ready), self.plain, self.ready, self.row_budget
        decode, failures, granted = None, [], None
        if k > budget:
            self.over_budget_ticks += 1
        if plain and grow_rows is not None:
            sessions = [ready[sid] for sid in ready if sid not in plain] if len(plain) < k else []
            # the others get what the plain rows leave, or up to half the rows if that is more (split as over
            # everyone: under the budget with the whole set's share); the plain rows ride in the rest, all of them
            # when they fit, else taking turns in round-robin order
            granted = self._grants_of(sessions, max(budget // 2, budget - len(plain)),
                                      max(1, budget // k) if k <= budget else None)
            room = budget - sum(granted)
            riders = (plain if room >= len(plain) else
                      dict(itertools.islice(((sid, plain[sid]) for sid in ready if sid in plain), room)))
            self.deferred_decode_rows += len(plain) - len(riders)
            if riders:
                batch = (self._batch.successor(riders) if self._batch is not None
                         else DecodeBatch(list(riders.values())))
                decode = self._grow_decode(batch, grow, grow_rows, failures, riding)
                if decode is batch:
                    self.fly(tick, batch.by_id)
        else:
            sessions = list(ready.values())
            granted = self._grants_of(sessions, budget, None)
        chunks = []  # (session, its front segment, rows granted, first position)
        for s, g in zip(sessions, granted):
            if g == 0:
                continue
            seg = s.queue[0]
            left, tail = seg.n - seg.done_rows, seg.head_rows
            if tail > 1:  # the rows to verify run together in the last chunk, even past the grant
                g = left if left <= tail else min(g, left - tail)
            chunks.append((s, seg, g, seg.first + seg.done_rows))
        resets = any(seg.truncate_to is not None and seg.done_rows == 0 for _, seg, _, _ in chunks)
        grown = (bool(chunks) and grow_many is not None and not resets  # (resets truncate first, one by one)
                 and grow_many([s for s, _, _, _ in chunks], [first + g for _, _, g, first in chunks]))
        items, now = [], time.perf_counter()
        for s, seg, g, first in chunks:
            if not grown:
                if not s.queue:  # evicted by an earlier session's grow
                    continue
                if seg.truncate_to is not None and seg.done_rows == 0:
                    s.runner.truncate(seg.truncate_to)
                if not grow(s, first + g):
                    failures.append((s, seg))
                    continue
            riding[s.id] = s  # no later session's grow may evict it
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
        if items and decode is not None:
            self.mixed_ticks += 1
        self._batch = decode
        self._replan(None if failures or applied or items else decode)
        return items, decode, failures, applied

    def _grants_of(self, sessions: list, budget: int, share: int | None) -> list[int]:
        """`grants` for the front segments of `sessions` (their prompts' turns, and in a burst every segment's)."""
        fronts = [s.queue[0] for s in sessions]
        needs = [seg.n - seg.done_rows for seg in fronts]
        order = list(map(turn, fronts)) if len(sessions) > budget else None  # (a burst)
        return self.grants(needs, budget, share, [prompt_turn(seg, self.row_budget) for seg in fronts], order)

    @staticmethod
    def _grow_decode(batch: DecodeBatch, grow: Callable[[Any, int], bool], grow_rows: Callable[[np.ndarray], bool],
                     failures: list, riding: dict) -> DecodeBatch | None:
        """Room for one more position of each session of the batch: in one allocation (the batch is returned as
        it is), or one by one (eviction, KV shares) with the refused ones added to failures and the others to
        `riding` as they get their blocks."""
        if grow_rows(batch.slots):
            return batch
        kept = []
        for s in batch.sessions:
            if not s.queue:  # evicted by an earlier session's grow
                continue
            seg = s.queue[0]
            if grow(s, seg.first + 1):
                riding[s.id] = s
                kept.append(s)
            else:
                failures.append((s, seg))
        return DecodeBatch(kept) if kept else None

    def retire(self, item: TickItem) -> None:
        """After the tick: pop a finished segment (see `settled`)."""
        s = item.session
        if item.final and s.queue and s.queue[0] is item.segment:
            self.release_rows(s.queue.popleft())
        self.settled(s)
