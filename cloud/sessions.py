"""The cloud context manager: sessions (ids, limits, idle TTL, LRU eviction) over the engine's paged KV pool.

A session is created on Open and owns a LayerRunner over the layers the cloud runs for it ([split, L) for hidden
states, [0, L) for token ids) whose cache is a PagedCache: block tables over the engine's pool, grown block by
block as rows arrive and freed on close, eviction or TTL. The session's Appends queue as Segments that the engine
computes. When a stream ends without Close the session is detached and can be resumed until its idle TTL runs
out; when the pool or the session count is full, detached sessions are evicted least-recently-used first, and
only then is the request refused with RESOURCE_EXHAUSTED.

Lossless mode: an Append may carry drafts for the engine to verify. After a rejected draft at position p the
session's rows from p on are wrong, so Appends starting at p or later are discarded (not computed) until the
client's Rollback, which queues behind the session's earlier work and truncates it.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch
from torch import Tensor

from cloud.auth import Identity
from cloud.engine.engine import Engine
from cloud.engine.kv_pool import PagedCache
from cloud.engine.scheduler import Segment
from cloud.errors import ServiceError, clip, invalid
from coexit.decoding import LayerRunner
from coexit.exits import ExitPolicy
from coexit.model import EarlyExitLM


@dataclass(frozen=True)
class Limits:
    max_sessions: int = 64
    kv_budget_bytes: int = 2 << 30
    max_length: int = 0  # 0: the model's max_position_embeddings
    max_rows_per_append: int = 4096
    max_message_bytes: int = 64 << 20
    idle_ttl_s: float = 300.0
    block_size: int = 16  # positions per KV block
    rows_per_tick: int = 256  # the engine's row budget per tick
    batch_wait: float = 1.0  # fraction of the last tick the engine may wait for recent sessions (0: never)
    identities: dict[str, Identity] = field(default_factory=dict)  # per-identity limits, by name
    static_decode: str = "auto"  # decode-only ticks: "auto" (CUDA graphs on a GPU), "eager", "off"
    overlap: str = "auto"  # decode-only ticks on a device lane while the next is prepared: "auto" (GPU), "on", "off"


@dataclass(slots=True)
class CloudSession:
    id: str
    runner: LayerRunner
    encoding: str
    tokens_input: bool
    stateless: bool
    max_length: int
    policy: ExitPolicy
    identity: str = ""  # who opened it: only they may resume it
    attached: bool = True
    last_used: float = field(default_factory=time.monotonic)
    bytes_received: int = 0
    bytes_sent: int = 0
    expected: int = 0  # the next position an Append must start at (rows queued included)
    queue: deque = field(default_factory=deque)  # Segments waiting for the engine
    failed: Exception | None = None  # an error for the next Append (queued rows that found no room)
    retired: bool = False  # closed or evicted
    unreported_layer_tokens: int = 0
    unreported_rows_filled: int = 0
    refusal: str = ""  # why the engine last found no room for its rows
    kv_fill: str = "exact"  # or "propagate": fill rows' deep KV is propagated from the row
    rejected_at: int | None = None  # position of the last rejected draft, until the client rolls back
    planned: bool = False  # in the scheduler's steady decode plan

    @property
    def length(self) -> int:
        return self.expected

    @property
    def cache(self) -> PagedCache:
        return self.runner.cache


class SessionManager:
    """Creates, finds, detaches, evicts and feeds sessions. Thread-safe (it shares the engine's lock)."""

    def __init__(self, model: EarlyExitLM, limits: Limits, engine: Engine) -> None:
        self.model, self.config, self.engine = model, model.config, engine
        self.max_length_cap = limits.max_length or self.config.max_position_embeddings
        self.limits = limits
        self.sessions: OrderedDict[str, CloudSession] = OrderedDict()  # LRU order: oldest first
        self._lock = engine.lock
        self.serves_tokens = model.start == 0
        engine.make_room = self._make_room
        engine.on_failure = self._no_room
        engine.quotas = any(i.kv_share < 1.0 for i in limits.identities.values())
        self.journal: list | None = None  # under --tp, rank 0 records every change here for the other ranks
        engine.pool.tables.reserve_slots(2 * limits.max_sessions + 1)  # opens do not resize slot arrays mid-tick

    # ---- the changes other tensor-parallel ranks replay (cloud/replica.py), in the order they were made --------
    def _do(self, op: str, *args):
        """Make one change (engine lock held) and, under tensor parallelism, record it for the other ranks."""
        if self.journal is not None:
            self.journal.append((op, args))
        return self.apply(op, *args)

    def apply(self, op: str, *args):
        """One change to the sessions and the engine's queues: made here, or replayed from rank 0's journal (where
        a Segment's waiter is a flag: it had one)."""
        if op == "submit":
            sid, seg = args
            s = self.sessions.get(sid)
            if s is None or not self._accept(s, seg):
                return False
            self.engine.submit(s, seg)
            return True
        if op == "create":
            sid, start, encoding, tokens_input, stateless, max_length, cloud_exits, identity, kv_fill = args
            runner = LayerRunner(self.model, start, self.config.num_hidden_layers,
                                 cache=PagedCache(self.pool, range(start, self.config.num_hidden_layers)))
            session = CloudSession(sid, runner, encoding, tokens_input, stateless, max_length,
                                   ExitPolicy(dict(cloud_exits)), identity, kv_fill=kv_fill)
            self.sessions[sid] = session
            self.engine.metrics.sessions.set(len(self.sessions))
            return session
        s = self.sessions.get(args[0])
        if s is None:  # (an eviction a replica's own scheduling already made)
            return None
        if op == "remove":
            self.sessions.pop(s.id, None)
            self.engine.release(s)
            self.engine.metrics.sessions.set(len(self.sessions))
        elif op == "rollback":
            _, seg = args
            s.expected, s.rejected_at = seg.truncate_to, None
            self.engine.submit(s, seg)
        elif op in ("resume", "touch"):
            s.attached = s.attached or op == "resume"
            self.sessions.move_to_end(s.id)
        elif op == "detach":
            s.attached = False
            self.engine.not_coming(s)
        else:
            raise ValueError(f"unknown session change {op!r}")
        return s

    @property
    def pool(self):
        return self.engine.pool

    def sweep(self, now: float | None = None) -> int:
        """Drop detached sessions idle past the TTL; returns how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            dead = [s for s in self.sessions.values()
                    if not s.attached and now - s.last_used > self.limits.idle_ttl_s]
            for s in dead:
                self._remove(s)
        return len(dead)

    def _remove(self, s: CloudSession) -> None:
        if s.id in self.sessions:
            self._do("remove", s.id)
        else:
            self.engine.release(s)

    def open(self, max_length: int, encoding: str, tokens_input: bool, stateless: bool,
             cloud_exits: dict[int, float], identity: str = "", kv_fill: str = "exact") -> CloudSession:
        self.sweep()
        if max_length <= 0:
            max_length = self.max_length_cap
        if max_length > self.max_length_cap:
            raise invalid(f"max_length {max_length} exceeds the server's limit of {self.max_length_cap} positions")
        if tokens_input and not self.serves_tokens:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               "this server holds only the deep layers; token-id input (cloud-only mode) needs a "
                               "server started with the whole model")
        start = 0 if tokens_input else self.config.split_layer
        for layer, threshold in cloud_exits.items():
            if layer not in self.config.exit_layers or not start < layer < self.config.num_hidden_layers:
                raise invalid(f"cloud exit at layer {layer} is not a cloud-side exit layer; cloud exits are "
                              f"{[e for e in self.config.exit_layers if e > start]}")
            if not math.isfinite(threshold):
                raise invalid(f"cloud exit threshold for layer {layer} must be finite")
        if kv_fill == "propagate" and cloud_exits:
            raise invalid("kv_fill PROPAGATE cannot be combined with cloud exits; open with one or the other")
        layers = range(start, self.config.num_hidden_layers)
        pool = self.pool
        whole = math.ceil(max_length / pool.block_size) * len(layers)
        if whole > pool.num_blocks:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"a session of max_length {max_length} may need {whole} KV blocks, more than the "
                               f"whole pool of {pool.num_blocks} ({pool.num_blocks * pool.bytes_per_block / 2**20:.1f} "
                               f"MiB); ask for a shorter max_length")
        with self._lock:
            self._evict_until(lambda: len(self.sessions) < self.limits.max_sessions)
            if len(self.sessions) >= self.limits.max_sessions:
                raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"the server already serves {len(self.sessions)} sessions (max_sessions "
                                   f"{self.limits.max_sessions}); retry later")
            ident = self.limits.identities.get(identity)
            if ident is not None and ident.max_sessions:
                self._evict_until(lambda: len(self._own(identity)) < ident.max_sessions, identity)
                if len(self._own(identity)) >= ident.max_sessions:
                    raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       f"identity {identity!r} already holds {len(self._own(identity))} sessions, "
                                       f"its max_sessions; close one or retry later")
            self._evict_until(lambda: pool.num_free >= len(layers))  # room for at least one block per layer
            if pool.num_free < len(layers):
                raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, self._full_message(len(layers)))
            session = self._do("create", secrets.token_hex(12), start, encoding, tokens_input, stateless, max_length,
                               dict(cloud_exits), identity, kv_fill)
        return session

    def _full_message(self, need: int) -> str:
        pool = self.pool
        return (f"the KV budget is full: {pool.num_used} of {pool.num_blocks} blocks ({pool.block_size} positions "
                f"each) are held by active sessions and {need} more are needed; retry later, close idle sessions, "
                f"or start the server with a larger --kv-budget-mib")

    def _own(self, identity: str) -> list[CloudSession]:
        return [s for s in self.sessions.values() if s.identity == identity]

    def _evict_until(self, enough, identity: str | None = None, keep: CloudSession | None = None) -> None:
        """Evict detached sessions (only `identity`'s, when given), least recently used first, until enough()
        holds or none is left to evict (engine lock held)."""
        if enough():  # the common case: no list of candidates to build
            return
        flying = self.engine.scheduler.in_flight
        for s in [s for s in self.sessions.values() if not s.attached and not flying(s) and s is not keep
                  and (identity is None or s.identity == identity)]:
            if enough():
                return
            self._remove(s)

    def _quota(self, identity: str) -> int | None:
        ident = self.limits.identities.get(identity)
        if ident is None or ident.kv_share >= 1.0:
            return None
        return int(ident.kv_share * self.pool.num_blocks)

    def _make_room(self, blocks: int, session: CloudSession) -> bool:
        """Room for `blocks` more blocks for `session`: first within its identity's KV share (evicting that
        identity's own detached sessions), then in the pool (evicting anyone's detached sessions)."""
        quota = self._quota(session.identity)
        if quota is not None:
            def held() -> int:
                return sum(s.cache.num_blocks for s in self._own(session.identity))

            self._evict_until(lambda: held() + blocks <= quota, session.identity, keep=session)
            if held() + blocks > quota:
                session.refusal = (f"identity {session.identity!r} holds {held()} of the {quota} KV blocks its "
                                   f"kv_share allows and needs {blocks} more; close one of its sessions or retry later")
                return False
        self._evict_until(lambda: self.pool.num_free >= blocks, keep=session)
        if self.pool.num_free < blocks:
            session.refusal = self._full_message(blocks)
            return False
        return True

    def _no_room(self, s: CloudSession, seg: Segment) -> ServiceError:
        return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"positions {seg.first}..{seg.last - 1} were not computed: {s.refusal}; the session "
                            f"keeps its first {seg.first} positions")

    def _accept(self, s: CloudSession, seg: Segment) -> bool:
        """(Lock held.) The session takes the segment's positions; False when its rows are discarded instead (they
        follow a rejected draft), True when they are to be queued ("submit" in the journal)."""
        s.expected = seg.last
        self.sessions.move_to_end(s.id)
        return s.rejected_at is None or seg.first < s.rejected_at

    def submit(self, s: CloudSession, segment: Segment) -> bool:
        """Queue an Append's rows for the engine after checking them against the session's state. Returns False
        when the rows were discarded instead: they follow a rejected draft (the client must roll back)."""
        result, = self.submit_many(((s, segment),))
        if isinstance(result, Exception):
            raise result
        return result

    def submit_many(self, items) -> list:
        """`submit` for several Appends at once (a front end's message), in order, under one hold of the lock, and
        queued with the engine in one pass. Each result is submit's, or the exception it raised (that Append's
        answer: the others go on)."""
        out, queued, now = [], [], time.monotonic()
        with self._lock:
            journal = self.journal
            for s, segment in items:
                try:
                    self._check(s, segment)
                except Exception as exc:
                    out.append(exc)
                    continue
                s.last_used = now
                if journal is not None:
                    journal.append(("submit", (s.id, segment)))
                ok = self._accept(s, segment)
                out.append(ok)
                if ok:
                    queued.append((s, segment))
            if queued:
                try:
                    self.engine.submit_many(queued)
                except Exception as exc:  # a server fault: each of them is answered with it (INTERNAL), none waits
                    out = [exc if r is True else r for r in out]
        return out

    def _check(self, s: CloudSession, segment: Segment) -> None:
        """(Lock held.) An Append's rows against the session's state: raises the error to answer it with."""
        if segment.drafts or segment.fill is not None:
            self._check_extras(s, segment)
        if s.retired or s.id not in self.sessions:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, "this session was closed or evicted; open a new one")
        if s.failed is not None:
            error, s.failed = s.failed, None
            raise error
        first = segment.first
        if s.stateless:
            if first != 0:
                raise invalid(f"a stateless session takes the whole context from position 0, got {first}")
            segment.truncate_to = 0
        elif first != s.expected:
            what = "a gap" if first > s.expected else "an overlap"
            raise invalid(f"rows start at position {first} but the session holds {s.expected} positions "
                          f"({what}); send positions from {s.expected} on")
        if segment.last > s.max_length:
            raise invalid(f"positions up to {segment.last} exceed this session's max_length {s.max_length}; "
                          f"open a session with a larger max_length")

    def _check_extras(self, s: CloudSession, seg: Segment) -> None:
        """Drafts and fill rows against the session's options and the Append's own rows."""
        if seg.drafts:
            if s.policy.thresholds:
                raise invalid("drafts are verified against the full model, but this session has cloud exits; open "
                              "a session without cloud_exits for lossless mode")
            if s.kv_fill == "propagate":
                raise invalid("drafts are verified against the full model, but this session's KV is approximate "
                              "(kv_fill PROPAGATE); open an EXACT session for lossless mode")
            positions = [d.position for d in seg.drafts]
            if positions != sorted(set(positions)) or positions[0] <= seg.first or positions[-1] > seg.last:
                raise invalid(f"draft positions {clip(str(positions))} must increase and lie in ({seg.first}, "
                              f"{seg.last}] (each follows one of this Append's rows)")
            if seg.want_token and positions[-1] == seg.last:
                raise invalid(f"position {seg.last} has both a draft and want_token; send one of them")
        if seg.fill is not None:
            if s.kv_fill != "propagate":
                raise invalid("fill_rows need a session opened with kv_fill PROPAGATE")
            if seg.want_token and bool(seg.fill[-1]):
                raise invalid("the last row cannot be a fill row when a token is wanted: its token needs the deep "
                              "layers")

    def rollback(self, s: CloudSession, length: int, waiter) -> None:
        """Forget positions >= length: queued behind the session's earlier work; later Appends start at length."""
        with self._lock:
            if s.retired:
                raise ServiceError(grpc.StatusCode.NOT_FOUND, "this session was closed or evicted; open a new one")
            if length > s.expected:
                raise invalid(f"cannot roll back to {length} positions: the session holds {s.expected}")
            s.last_used = time.monotonic()
            self._do("rollback", s.id, Segment(length, torch.zeros(0), False, truncate_to=length, waiter=waiter))

    def resume(self, sid: str, identity: str = "") -> CloudSession:
        self.sweep()
        with self._lock:
            s = self.sessions.get(sid)
            if s is None or s.identity != identity:  # another identity's session looks exactly like no session
                raise ServiceError(grpc.StatusCode.NOT_FOUND,
                                   f"no session {clip(sid)}: it expired, was evicted, or the server restarted; open a "
                                   f"new session and resend its context")
            if s.attached:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"session {clip(sid)} is still attached to another stream")
            s.last_used = time.monotonic()
            return self._do("resume", sid)

    def touch(self, s: CloudSession) -> None:
        with self._lock:
            s.last_used = time.monotonic()
            if s.id in self.sessions:
                self._do("touch", s.id)

    def detach(self, s: CloudSession) -> None:
        with self._lock:
            s.last_used = time.monotonic()
            if s.id in self.sessions:
                self._do("detach", s.id)
            else:
                s.attached = False

    def close(self, s: CloudSession) -> None:
        with self._lock:
            self._remove(s)


def check_rows(rows: Tensor, hidden_size: int) -> None:
    if rows.shape[0] == 0:
        raise invalid("an Append must carry at least one row")
    if rows.shape[1] != hidden_size:
        raise invalid(f"hidden rows have {rows.shape[1]} columns but this model's hidden size is {hidden_size}")
    if rows.dtype == torch.float32 and rows.device.type == "cpu":  # the wire's rows: numpy keeps the GIL
        if np.isfinite(rows.numpy()).all():
            return
    elif bool(torch.isfinite(rows).all()):  # one reduction on the hot path
        return
    bad = ~torch.isfinite(rows).all(dim=1)
    if bool(bad.any()):
        raise invalid(f"hidden rows {bad.nonzero().flatten().tolist()[:8]} hold NaN or Inf values")
