"""The engine thread: drains submitted Appends into the scheduler, runs one batched tick at a time, and hands
each finished Append its result. The gRPC side only submits and awaits; it never computes.

Locking: `lock` guards the scheduler, the session queues and the KV pool's free list, and is shared with the
SessionManager. It is never held during a tick's compute, so the event loop only ever waits for bookkeeping.
Sessions in a tick being computed are in flight (`Scheduler.in_flight`: a decode batch is registered whole, with no
pass over its sessions); one closed or evicted meanwhile is released right after the tick.

Decode rows: the plain decode rows of a tick (one row each, see scheduler.py) run as one DecodeBatch on the runner's
static step. In a tick that also has prompt chunks, the plain ones (straight through the deep layers) ride one mixed
pass with the decode rows (mixed.py), mostly read where they were staged as they were queued (staging.PromptRing),
and the rest (catch-up, drafts, propagated KV, cloud exits) take the general path. The decode rows' blocks grow in
one allocation; the batch is settled in one short loop and its results reach `fan_out` as one StepReplies. When
the scheduler hands back its last plan (the same sessions, one plain decode row each), nothing is scheduled at all.
In one process `deliver` answers each Append's waiter; with front-end processes, cloud.ipc packs the answers into
one array per front end. `run_tick` returns its phase time stamps (bench/engine_overhead.py reads them).

Overlap (`overlap`, on by default on a GPU): a decode-only tick is prepared on this thread (claims, slot ids,
changed block tables, as host arrays) and its device half runs on the device lane (lane.py); its sessions are held
by the scheduler, and the engine at once schedules and launches the next tick among the other sessions, then
settles and hands out the first while the second computes. A tick with general-path work waits for the lane and
runs here. A session's rows never ride two ticks at once, so tokens are those of serving it alone.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import grpc
import numpy as np

from cloud.engine.graphs import DecodeGraphs
from cloud.engine.kv_pool import KVPool
from cloud.engine.lane import DeviceLane
from cloud.engine.metrics import EngineMetrics
from cloud.engine.runner import BatchedRunner, SteadyOutput, TokenResult, VerdictResult
from cloud.engine.scheduler import DecodeBatch, Scheduler, Segment, TickItem
from cloud.engine.staging import RowsAt
from cloud.errors import ServiceError
from coexit.model import EarlyExitLM

log = logging.getLogger("coexit.cloud")


@dataclass
class StepReplies:
    """A tick's decode rows' answers, row by row in their batch's order; a fan-out reads them in bulk or per
    Append."""

    sessions: list
    segments: list[Segment]
    keys: np.ndarray  # (n,) int64: each row's waiter's key (cloud.ipc), -1 where it has none
    out: SteadyOutput
    queue_s: np.ndarray  # (n,) seconds from each row's arrival to its tick
    compute_s: float
    tick: int
    layer_tokens: int  # per row: every deep layer
    retired: bool = False  # some of the sessions were closed or evicted during the tick

    def outcomes(self, rows=None):
        """(waiter, SegmentDone) of each row (or of `rows`) whose session is still open."""
        out, deep, tick, c = self.out, self.layer_tokens, self.tick, self.compute_s
        for i in range(len(self.segments)) if rows is None else rows:
            s, seg = self.sessions[i], self.segments[i]
            if not s.retired:
                token = TokenResult(out.tokens[i], out.logprobs[i], s.runner.stop, out.logits, row=i)
                yield seg.waiter, SegmentDone(token, deep, c, (tick, tick), [], 0, float(self.queue_s[i]))


@dataclass
class _Tick:
    """One tick from its scheduling to its hand-out."""

    tick: int
    items: list[TickItem]
    decode: DecodeBatch | None
    finished: list  # (waiter, outcome) known at scheduling: applied rollbacks, refusals
    rows: RowsAt | None = None  # the decode rows (and their segments), in the scheduler's staged rows
    started: float = 0.0
    seconds: float = 0.0
    out: SteadyOutput | None = None
    results: list = field(default_factory=list)
    error: Exception | None = None
    future: Future | None = None  # the decode batch's results, when it runs on the device lane
    held: bool = False  # its decode sessions are held by the scheduler until it settles


@dataclass
class SegmentDone:
    token: TokenResult | None
    layer_tokens: int
    compute_s: float  # seconds of the ticks this Append took part in
    ticks: tuple[int, int]  # first and last tick numbers
    verdicts: list[VerdictResult] = field(default_factory=list)
    rows_filled: int = 0  # layer-rows whose KV was propagated
    queue_s: float = 0.0  # from submission to the tick that started it


class Engine:
    def __init__(self, model: EarlyExitLM, pool: KVPool, row_budget: int = 256,
                 metrics: EngineMetrics | None = None, batch_wait: float = 1.0, static_decode: str = "auto",
                 overlap: str = "auto", thread: bool = True) -> None:
        """static_decode: "auto" captures decode-only ticks in CUDA graphs on a GPU (on a CPU it runs the same
        static step eagerly at each tick's exact shape), "eager" runs it without capture but padded to the graphs'
        buckets, "off" always takes the general path. overlap: "on" runs decode-only ticks on a device lane
        (lane.py) and prepares the next tick meanwhile, "off" never, "auto" on a GPU only. thread=False: no engine
        thread (a tensor-parallel follower, cloud/replica.py, runs the ticks rank 0 runs)."""
        self.model, self.pool = model, pool
        self.scheduler = Scheduler(row_budget)
        on_gpu = next(model.parameters()).device.type == "cuda"
        graphs = None
        if static_decode in ("eager", "auto"):  # auto: CUDA graphs on a GPU, the exact shapes eagerly elsewhere
            graphs = DecodeGraphs(model, pool, model.config.split_layer, model.config.num_hidden_layers,
                                  capture=static_decode == "auto" and on_gpu, pad=static_decode == "eager" or on_gpu)
        self.runner = BatchedRunner(model, graphs)
        if overlap not in ("auto", "on", "off"):
            raise ValueError(f"overlap must be auto, on or off, got {overlap!r}")
        use_lane = graphs is not None and (overlap == "on" or (overlap == "auto" and on_gpu))
        self.lane = DeviceLane(next(model.parameters()).device) if use_lane else None
        self.overlapped_ticks = 0  # ticks launched while the one before was still on the lane
        if graphs is not None:
            self.scheduler.steady_start = model.config.split_layer
        self.quotas = False  # identities with KV shares: grow session by session (set by the SessionManager)
        self.fan_out: Callable = self.deliver  # hands each tick's results out (cloud.ipc packs them per front end)
        self.metrics = metrics or EngineMetrics()
        self.lock = threading.RLock()
        self._wake = threading.Condition(self.lock)
        self.make_room: Callable[[int, object], bool] = lambda blocks, s: pool.num_free >= blocks  # the manager's
        self.on_failure: Callable[[object, Segment], Exception] = lambda s, seg: RuntimeError("no room")
        self.ticks = 0
        self.batch_wait = batch_wait
        self._served: tuple = ((), ())  # the sessions the last two ticks served, as groups (read by _coalesce)
        self._awaited: set | None = None  # while _coalesce waits: the ids of the recent sessions not back yet
        self._last_tick_s = 0.0
        self.sync: Callable[[str], None] | None = None  # under --tp: rank 0's journal goes out ("tick", "settle")
        self.beat_s: float | None = None  # under --tp: idle this long, the engine sends a "beat" through sync
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name="coexit-engine")
        if thread:
            self._thread.start()

    def lockstep(self) -> None:
        """Tensor-parallel ranks (cloud/replica.py) must lay out every pass alike from the same journal: prompt rows
        are not staged in the PromptRing, where a pass's layout would depend on when rank 0's Appends land during a
        tick."""
        self.scheduler.prompts = None

    # ---- called from the gRPC side (under or outside `lock`) -----------------------------------------------
    def heartbeat(self, seconds: float) -> None:
        """Under --tp: from now on, whenever the engine has been idle for `seconds`, it sends a "beat" through
        `sync` (cloud/replica.py). Wakes the engine thread, which may already be waiting without a timeout."""
        with self._wake:
            self.beat_s = seconds
            self._wake.notify()

    def submit(self, session, segment: Segment) -> None:
        self.submit_many(((session, segment),))

    def submit_many(self, items) -> None:
        """Queue (session, segment) pairs in order (a front end's message of Appends, in one pass) and wake the
        engine once: if it waits for work, or, while it gathers a cohort, when the last of the cohort is back."""
        with self._wake:
            self.scheduler.submit_many(items)
            awaited = self._awaited
            if awaited is None:
                self._wake.notify()
            elif awaited:
                ready = self.scheduler.ready
                for session, _ in items:
                    if session.id in ready:  # one more of the cohort is back
                        self._cross_off(session)

    def not_coming(self, session) -> None:
        """The session left (closed, evicted, detached): a cohort being gathered stops waiting for it."""
        with self._wake:
            self._cross_off(session)

    def _cross_off(self, session) -> None:
        """(Under the lock.) The cohort being gathered no longer waits for the session: wake the engine for the
        last one."""
        awaited = self._awaited
        if awaited and session.id in awaited:
            awaited.discard(session.id)
            if not awaited:
                self._wake.notify()

    def release(self, session) -> list[Segment]:
        """Forget a session (close, eviction, TTL): drop its queue and free its blocks (after the current tick
        when it is being computed). Returns the dropped segments."""
        with self.lock:
            dropped = self.scheduler.drop(session)
            session.retired = True
            if not self.scheduler.in_flight(session):
                session.runner.cache.release()
            self._update_gauges()
            self.not_coming(session)
        gone = ServiceError(grpc.StatusCode.NOT_FOUND, "the session was closed or evicted before these rows were "
                                                       "computed; open a new session and resend its context")
        for seg in dropped:
            if seg.waiter is not None:
                seg.waiter(gone)
        return dropped

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self.lane is not None:
            self.lane.close()
        if self.sync is not None:
            with self.lock:
                self.sync("stop")

    # ---- the engine thread ---------------------------------------------------------------------------------
    def _grow(self, session, upto: int) -> bool:
        cache = session.runner.cache
        need = cache.blocks_needed(upto)
        if need == 0:
            return True
        if not self.make_room(need, session):
            return False
        return cache.grow(upto, need)

    def _loop(self) -> None:
        pending: _Tick | None = None  # an overlapped tick on the device lane, settled after the next launch
        while True:
            with self._wake:  # wait for rows, or for the tick on the lane to end
                while not self.scheduler.ready and not self._stop and (
                        pending is None or (pending.future is not None and not pending.future.done())):
                    if not self._wake.wait(self.beat_s) and self.sync is not None:
                        self.sync("beat")  # idle for beat_s: the tensor-parallel followers hear from rank 0
                if pending is None:
                    self._coalesce()
                stop = self._stop
            if stop:
                if pending is not None:
                    self._finish(pending, self.fan_out)
                return
            if self.lane is None:
                self.run_tick()
            else:
                pending = self._overlapped(pending)

    def run_tick(self, fan_out: Callable | None = None) -> dict[str, float]:
        """One tick: schedule, compute, settle, hand the results out (`fan_out(decoded, finished)`, by default
        `self.fan_out`). Returns its phase time stamps (perf_counter): start, scheduled, outputs (the compute and
        its outputs done), settled, fanned."""
        stamps = {"start": time.perf_counter()}
        t = self._schedule()
        t.started = stamps["scheduled"] = time.perf_counter()
        self._compute(t)
        stamps["outputs"] = time.perf_counter()
        self._finish(t, fan_out or self.fan_out, stamps)
        return stamps

    def _overlapped(self, pending: _Tick | None) -> _Tick | None:
        """One turn of the overlapped loop (a device lane): schedule the next tick among the sessions not on the
        device; a decode-only tick is prepared here and launched on the lane behind `pending`, then `pending` is
        settled and handed out while the new one computes. A tick with general-path work waits for the lane and
        runs here. Returns the tick now on the lane."""
        t = self._schedule()
        if t.items or t.decode is None:
            if pending is not None:
                self._finish(pending, self.fan_out)
            if t.items or t.finished:
                t.started = time.perf_counter()
                self._compute(t)
                self._finish(t, self.fan_out)
            return None
        with self.lock:
            try:
                launch = self.runner.prepare_steady(t.decode.slots, t.rows)
            except Exception as exc:  # a server fault: this tick's Appends fail, the sessions roll back
                log.exception("engine tick failed")
                launch, t.error = None, exc
            self.scheduler.hold(t.decode.sessions)
            t.held = True
        t.started = time.perf_counter()
        if launch is not None:
            t.future = self.lane.submit(self.runner.compute_steady, launch, t.rows)
            t.future.add_done_callback(self._lane_done)
            self.overlapped_ticks += pending is not None
        if pending is not None:
            self._finish(pending, self.fan_out)
        return t

    def _lane_done(self, _future) -> None:
        with self._wake:
            self._wake.notify()

    def _schedule(self) -> _Tick:
        """The scheduler's choice for the next tick (under the lock): the steady plan again, or the general
        path's chunks beside a decode batch; their sessions are marked in flight."""
        items, failures, finished = [], [], []
        with self.lock:
            if self.sync is not None:
                self.sync("tick")
            tick = self.ticks
            self.ticks += 1
            decode = self.scheduler.steady()
            if decode is not None and not self._grow_rows(decode.slots):
                decode = None
                self.scheduler.invalidate()
            if decode is not None:
                self.scheduler.fly(tick, decode.by_id)
            else:
                over, deferred = self.scheduler.over_budget_ticks, self.scheduler.deferred_decode_rows
                try:
                    items, decode, failures, applied = self.scheduler.next_tick(self._grow, tick, self._grow_rows,
                                                                                self._grow_many)
                except Exception as exc:  # a server fault while scheduling: no Append may wait forever
                    log.exception("engine scheduling failed")
                    finished = self._fail_all(exc)
                else:  # rollbacks applied
                    finished = [(seg.waiter, SegmentDone(None, 0, 0.0, (tick, tick))) for seg in applied]
                    if self.scheduler.over_budget_ticks != over:
                        self.metrics.over_budget.inc()
                    if self.scheduler.deferred_decode_rows != deferred:
                        self.metrics.deferred_decode.inc(self.scheduler.deferred_decode_rows - deferred)
                finished += [w for s, seg in failures for w in self._fail(s, seg)]
            if decode is None and not items:  # nothing rides this tick (or scheduling failed)
                self.scheduler.landed(tick)
            rows = self.scheduler.staged.at(decode.slots) if decode is not None else None
        return _Tick(tick, items, decode, finished, rows)

    def _compute(self, t: _Tick) -> None:
        """A tick's device work on this thread (BatchedRunner.run_tick): the decode batch on the static step, or
        with the plain prompt chunks in one mixed pass, and the general path's chunks."""
        try:
            slots = t.decode.slots if t.decode is not None else None
            t.out, t.results = self.runner.run_tick(slots, t.rows, t.items, self.scheduler.prompts)
        except Exception as exc:  # a server fault: fail this tick's Appends, keep serving
            log.exception("engine tick failed")
            t.error = exc
        t.seconds = time.perf_counter() - t.started

    def _finish(self, t: _Tick, fan_out: Callable, stamps: dict | None = None) -> None:
        """Settle a computed tick (waiting for the lane when it ran there) and hand its results out."""
        if t.future is not None:
            try:
                t.out = t.future.result()
            except Exception as exc:
                log.exception("engine tick failed")
                t.error = exc
            t.seconds = time.perf_counter() - t.started
        decode, items, seconds, tick, held = t.decode, t.items, t.seconds, t.tick, t.held
        with self.lock:
            if self.sync is not None:
                self.sync("settle")
            self.scheduler.landed(tick)
            if t.error is not None and decode is not None:  # its rows roll back with the general path's
                if held:
                    for s in decode.sessions:
                        self.scheduler.unhold(s)
                items = [TickItem(s, seg, seg.rows, seg.first, True, None, [], 1)
                         for s, seg in zip(decode.sessions, t.rows.segments)] + items
                decode = None
            self._last_tick_s = seconds
            finished = t.finished + self._settle(items, t.results, t.error, seconds, tick)
            decoded = None
            if decode is not None:  # (after the items: the ready set is then often exactly its sessions)
                decoded = self._settle_decode(decode, t.rows, t.out, seconds, tick, t.started, held)
            self._record(items, decode, seconds)
            self._served = (self._served[1], ([it.session for it in items],
                                              decode.sessions if decode is not None else ()))
        if stamps is not None:
            stamps["settled"] = time.perf_counter()
        fan_out(decoded, finished)
        if stamps is not None:
            stamps["fanned"] = time.perf_counter()

    def _grow_many(self, sessions: list, uptos: list[int]) -> bool:
        """Blocks for a tick's chunks (session i up to position uptos[i]) in one allocation; False (they grow
        session by session) when identities have KV quotas, their caches span different layers, or the pool must
        evict first, or there are fewer than four chunks (one by one is then as fast)."""
        layers = sessions[0].runner.cache.layers
        if len(sessions) < 4 or self.quotas or any(s.runner.cache.layers != layers for s in sessions):
            return False
        slots = np.fromiter((s.runner.cache.slot for s in sessions), dtype=np.int64, count=len(sessions))
        return self.pool.grow_slots(slots, np.array(uptos, dtype=np.int64), layers)

    def _grow_rows(self, slots: np.ndarray) -> bool:
        """Blocks for the decode rows at `slots` that cross into a new block, in one allocation; False (they grow
        session by session) when the pool must evict first or identities have KV quotas."""
        t, bs, lo = self.pool.tables, self.pool.block_size, self.scheduler.steady_start
        pos = t.lengths[lo, slots]
        crossing = np.flatnonzero(pos >= t.nblocks[lo, slots] * bs)
        if crossing.size == 0:
            return True
        layers = range(lo, self.model.config.num_hidden_layers)
        if self.quotas or self.pool.num_free < crossing.size * len(layers):
            return False
        return self.pool.grow_rows(slots[crossing], layers)

    def _settle_decode(self, decode, rows: RowsAt, out: SteadyOutput, seconds: float, tick: int,
                       started: float, held: bool = False) -> StepReplies:
        """The decode rows' segments are done: pop them (a session closed during the tick is released; `held`:
        the tick ran on the lane, its sessions come back to the scheduler now). One pass that touches each session
        once: on a CPU a tick's passes over its sessions cost their memory reads, not their Python."""
        sched = self.scheduler
        queue_s = started - rows.submitted
        ready, plain, retired, done = sched.ready, sched.plain, False, []
        for s in decode.sessions:
            if s.retired:  # closed or evicted during the tick: its queue was dropped
                sched.drop(s)
                s.runner.cache.release()
                retired = True
                continue
            q = s.queue
            q.popleft()
            if held:
                sched.unhold(s)
            elif q:  # more was queued during the tick
                sched.settled(s)
            else:
                done.append(s.id)
        if len(done) == len(ready):  # they are the whole ready set (plain is a part of it): nothing is left
            ready.clear()
            plain.clear()
        else:
            for sid in done:
                del ready[sid]
                plain.pop(sid, None)
        self.metrics.queue_wait.observe_many(queue_s)
        deep = self.model.config.num_hidden_layers - sched.steady_start
        return StepReplies(decode.sessions, rows.segments, rows.keys, out, queue_s, seconds, tick, deep, retired)

    @staticmethod
    def deliver(decoded: StepReplies | None, finished: list) -> None:
        """The in-process fan-out: every Append's waiter gets its own outcome. Waiters of one event loop (those
        with a `loop_replies`, cloud/backend.py) get theirs in one hand-over, so the loop wakes once a tick, not
        once an Append (each wake a write to its self-pipe and a trip of the GIL between the threads)."""
        groups: dict[int, tuple] = {}
        for waiter, outcome in itertools.chain(decoded.outcomes() if decoded is not None else (), finished):
            replies = getattr(waiter, "loop_replies", None)
            if replies is not None:
                group = groups.get(id(replies))
                if group is None:
                    group = groups[id(replies)] = (replies, [])
                group[1].append((waiter, outcome))
            elif waiter is not None:
                waiter(outcome)
        for replies, pairs in groups.values():
            replies.settle_many(pairs)

    def _coalesce(self) -> None:
        """Decode traffic settles into cohorts: the sessions answered by the last tick are still on their round
        trip when the engine starts the next. Wait a little (at most `batch_wait` of the last tick's time) for
        the attached sessions served in the last two ticks to come back, so one tick carries them all and its
        fixed costs are paid once. A lone session never waits. The submitting threads cross the returning
        sessions off `_awaited` and wake the engine once, for the last of them (not once per Append, each wake a
        pass over the cohort); any other wake-up (a release, stop) drops the sessions that have left."""
        if self.batch_wait <= 0:
            return
        recent = {s.id: s for groups in self._served for group in groups for s in group}
        if not recent:
            return
        deadline = time.perf_counter() + self.batch_wait * self._last_tick_s
        ready = self.scheduler.ready
        self._awaited = {sid for sid, s in recent.items() if sid not in ready and s.attached and not s.retired}
        try:
            while self._awaited and not self._stop:
                left = deadline - time.perf_counter()
                if left <= 0:
                    return
                self._wake.wait(left)
                self._awaited = {sid for sid in self._awaited
                                 if sid not in ready and recent[sid].attached and not recent[sid].retired}
        finally:
            self._awaited = None

    def _roll_back(self, session, first: int, error: Exception) -> list:
        """Drop a session's queued segments and forget its positions from `first` on; their Appends get `error`
        (or, when none is waiting, the session's next Append does)."""
        dropped = self.scheduler.drop(session)
        session.runner.truncate(first)
        session.expected = first
        waiters = [(seg.waiter, error) for seg in dropped if seg.waiter is not None]
        if not waiters:
            session.failed = error  # the Appends that queued these rows were already answered: tell the next one
        return waiters

    def _fail_all(self, error: Exception) -> list:
        """Fail every queued segment, rolling each session back to before its oldest queued rows."""
        return [w for s in list(self.scheduler.ready.values()) if s.queue
                for w in self._roll_back(s, s.queue[0].first, error)]

    def _fail(self, session, seg: Segment) -> list:
        """No room for a segment: roll the session back to before it and drop what was queued after it."""
        return self._roll_back(session, seg.first, self.on_failure(session, seg))

    def _settle(self, items: list[TickItem], results, error, seconds: float, tick: int) -> list:
        finished = []
        for i, item in enumerate(items):
            s, seg = item.session, item.segment
            if s.retired:  # closed or evicted during the tick: its Appends were answered NOT_FOUND then
                self.scheduler.drop(s)
                s.runner.cache.release()
                continue
            if error is not None:
                finished += self._roll_back(s, seg.first, error)
            else:
                run, token, verdicts = results[i]
                seg.layer_tokens += run.rows_computed
                seg.rows_filled += run.rows_filled
                seg.compute_s += seconds
                if item.final:
                    s.unreported_layer_tokens += seg.layer_tokens
                    s.unreported_rows_filled += seg.rows_filled
                    rejected = [v.position for v in verdicts if not v.accepted]
                    if rejected:  # rows from there on are wrong: discard Appends until the client rolls back
                        s.rejected_at = rejected[0]
                    if seg.waiter is not None:
                        done = SegmentDone(token, s.unreported_layer_tokens, seg.compute_s, (seg.first_tick, tick),
                                           verdicts, s.unreported_rows_filled, seg.started - seg.submitted)
                        s.unreported_layer_tokens = s.unreported_rows_filled = 0
                        finished.append((seg.waiter, done))
                    self.metrics.queue_wait.observe(seg.started - seg.submitted)
                self.scheduler.retire(item)
        return finished

    def _record(self, items: list[TickItem], decode, seconds: float) -> None:
        n = len(decode.sessions) if decode is not None else 0
        if not items and not n:
            return
        m = self.metrics
        rows = n + sum(int(it.x.shape[0]) for it in items)
        m.tick_rows.observe(rows)
        m.tick_sessions.observe(n + len(items))
        m.tick_seconds.observe(seconds)
        m.rows.inc(rows)
        m.tokens.inc(n + sum(1 for it in items if it.head))
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.blocks_used.set(self.pool.num_used)
        self.metrics.blocks_free.set(self.pool.num_free)
