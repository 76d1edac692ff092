"""What a gRPC front end asks of the session/engine side, and its in-process implementation.

The front end (cloud/service.py) parses and validates protobuf and keeps, per stream, only a SessionHandle. Every
stateful step (open, resume, append, close, detach, byte accounting) goes through a backend: `LocalBackend` runs
the SessionManager and the engine thread in this process; `cloud.ipc.RemoteBackend` forwards the same calls to an
engine process shared by several front-end processes, which serves them with a LocalBackend of its own.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from dataclasses import asdict, dataclass, field

import grpc
import torch
from torch import Tensor

import coexit
from cloud.engine.engine import Engine, SegmentDone
from cloud.engine.kv_pool import KVPool
from cloud.engine.scheduler import Draft, Segment
from cloud.errors import ServiceError
from cloud.sessions import CloudSession, Limits, SessionManager
from coexit.sampling import SamplingParams


@dataclass
class ModelInfo:
    """The model facts a front end needs to answer Info and validate requests."""

    fingerprint: str
    split_layer: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    exit_layers: list[int]
    serves_tokens: bool
    max_length: int
    dtype: str  # rows are handed to the engine in this dtype

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SessionHandle:
    id: str
    encoding: str
    tokens_input: bool
    length: int
    resumed: bool


@dataclass
class AppendOutcome:
    length: int
    has_token: bool = False
    token_id: int = 0
    logprob: float = 0.0
    exit_layer: int = 0
    top: list[tuple[int, float]] = field(default_factory=list)
    logits: Tensor | None = None  # (V,) when asked for
    layer_tokens: int = 0
    compute_s: float = 0.0
    verdicts: list[tuple[int, bool, int, float]] = field(default_factory=list)  # (position, accepted, token, lp)
    discarded: bool = False  # the rows follow a rejected draft and were not computed
    rows_filled: int = 0
    queue_s: float = 0.0  # waiting for the engine before its first chunk ran

    @classmethod
    def of(cls, length: int, done) -> AppendOutcome:
        """The outcome of an Append the engine finished (its SegmentDone), the session then `length` long."""
        out = cls(length, layer_tokens=done.layer_tokens, compute_s=done.compute_s,
                  verdicts=[(v.position, v.accepted, v.token_id, v.logprob) for v in done.verdicts],
                  rows_filled=done.rows_filled, queue_s=done.queue_s)
        t = done.token
        if t is not None:
            out.has_token, out.token_id, out.logprob, out.exit_layer, out.top = (True, t.token_id, t.logprob,
                                                                                 t.exit_layer, t.top)
        return out


@dataclass
class OpenArgs:
    resume_id: str = ""
    max_length: int = 0
    encoding: str = "fp32"
    tokens_input: bool = False
    stateless: bool = False
    cloud_exits: dict[int, float] = field(default_factory=dict)
    identity: str = ""  # the caller, as the interceptor authenticated it
    kv_fill: str = "exact"


class LocalBackend:
    """Sessions and the batching engine in this process. Byte counts arrive as (received, sent) deltas."""

    def __init__(self, model: coexit.EarlyExitLM, limits: Limits, kv_heads: int | None = None,
                 engine_thread: bool = True) -> None:
        """kv_heads: this rank's KV heads under tensor parallelism; engine_thread=False: a follower rank's (its
        ticks are rank 0's, cloud/replica.py)."""
        p = next(model.parameters())
        pool = KVPool.from_budget(model.config, limits.kv_budget_bytes, limits.block_size, p.dtype, p.device,
                                  kv_heads)
        engine = Engine(model, pool, limits.rows_per_tick, batch_wait=limits.batch_wait,
                        static_decode=limits.static_decode, overlap=limits.overlap, thread=engine_thread)
        self._over(SessionManager(model, limits, engine))

    @classmethod
    def over(cls, manager: SessionManager) -> LocalBackend:
        """A backend over an existing SessionManager and its engine (bench/engine_ingest.py's harness)."""
        backend = cls.__new__(cls)
        backend._over(manager)
        return backend

    def _over(self, manager: SessionManager) -> None:
        self.manager, self.engine = manager, manager.engine
        model = manager.model
        p = next(model.parameters())
        c = model.config
        self.info = ModelInfo(model.fingerprint, c.split_layer, c.num_hidden_layers, c.hidden_size, c.vocab_size,
                              list(c.exit_layers), self.manager.serves_tokens, self.manager.max_length_cap,
                              str(p.dtype).removeprefix("torch."))
        self.device = p.device
        self._loops: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its _LoopReplies

    def stop(self) -> None:
        self.engine.stop()

    def _get(self, sid: str) -> CloudSession:
        s = self.manager.sessions.get(sid)
        if s is None:
            raise self.missing()
        return s

    @staticmethod
    def missing() -> ServiceError:
        """The answer to a call for a session this server does not hold."""
        return ServiceError(grpc.StatusCode.NOT_FOUND, "this session was closed, evicted or expired; open a new "
                                                       "session and resend its context")

    async def open(self, args: OpenArgs) -> SessionHandle:
        if args.resume_id:
            s = self.manager.resume(args.resume_id, args.identity)
            return SessionHandle(s.id, s.encoding, s.tokens_input, s.length, True)
        s = self.manager.open(args.max_length, args.encoding, args.tokens_input, args.stateless, args.cloud_exits,
                              args.identity, args.kv_fill)
        return SessionHandle(s.id, s.encoding, s.tokens_input, 0, False)

    def submit(self, s: CloudSession, first: int, rows: Tensor, want_token: bool, sampling: SamplingParams,
               top_k: int, acct: tuple[int, int], drafts, fill: Tensor | None, waiter) -> AppendOutcome | None:
        """Queue an Append's rows; `waiter` (engine thread) gets its outcome when it wants a token or drafts.
        Returns the outcome now when there is nothing to wait for (discarded rows, or rows without a token)."""
        segment = self.segment(s, first, rows, want_token, sampling, top_k, acct, drafts, fill, waiter)
        if not self.manager.submit(s, segment):
            return AppendOutcome(s.length, discarded=True)
        if want_token or drafts:
            return None
        return AppendOutcome(s.length)  # without a token: computed in the background

    def segment(self, s: CloudSession, first: int, rows: Tensor, want_token: bool, sampling: SamplingParams,
                 top_k: int, acct: tuple[int, int], drafts, fill: Tensor | None, waiter) -> Segment:
        """An Append's Segment, its bytes counted to the session and its rows on the engine's device; the waiter
        kept only when the Append waits for something (a token or verdicts). One row that wants a token (a decode
        row) stays on the host: the engine stages it there and copies a tick's decode rows to the device at once
        (staging.py), instead of a copy per Append; where such a row takes the general path, the runner moves it."""
        self._account(s, acct)
        if rows.device != self.device and not (want_token and rows.shape[0] == 1):
            rows = rows.to(self.device)
        return Segment(first, rows, want_token, sampling, top_k, drafts=list(drafts) if drafts else (), fill=fill,
                       waiter=waiter if want_token or drafts else None)

    def _waiters(self) -> _LoopReplies:
        loop = asyncio.get_running_loop()
        replies = self._loops.get(loop)
        if replies is None:
            replies = self._loops[loop] = _LoopReplies(loop)
        return replies

    async def append(self, sid: str, first: int, rows: Tensor, want_token: bool, sampling: SamplingParams,
                     top_k: int, want_logits: bool, acct: tuple[int, int], drafts: list[Draft] = (),
                     fill: Tensor | None = None) -> AppendOutcome:
        s = self._get(sid)
        fut = asyncio.get_running_loop().create_future()
        now = self.submit(s, first, rows, want_token, sampling, top_k, acct, drafts, fill,
                          self._waiters().waiter(fut))
        if now is not None:
            return now
        done: SegmentDone | BaseException = await fut
        if isinstance(done, BaseException):
            raise done
        out = AppendOutcome.of(s.length, done)
        if done.token is not None and want_logits:
            out.logits = done.token.logits.float().cpu()
        return out

    async def rollback(self, sid: str, length: int, acct: tuple[int, int]) -> int:
        """Forget positions >= length once the session's queued work is done; returns the session's length."""
        s = self._get(sid)
        self._account(s, acct)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.manager.rollback(s, length, lambda outcome: loop.call_soon_threadsafe(_settle, fut, outcome))
        done = await fut
        if isinstance(done, BaseException):
            raise done
        return s.length

    async def close(self, sid: str, acct: tuple[int, int]) -> tuple[int, int]:
        s = self._get(sid)
        self._account(s, acct)
        self.manager.close(s)
        return s.bytes_received, s.bytes_sent

    async def detach(self, sid: str, acct: tuple[int, int]) -> None:
        s = self.manager.sessions.get(sid)
        if s is not None:
            self._account(s, acct)
            self.manager.detach(s)

    async def sweep_forever(self) -> None:
        """Drop detached sessions past their idle TTL, every half TTL (at most every 30 s), until cancelled."""
        ttl = self.manager.limits.idle_ttl_s
        while True:
            await asyncio.sleep(max(0.05, min(30.0, ttl / 2)))
            self.manager.sweep()

    @staticmethod
    def _account(s: CloudSession, acct: tuple[int, int]) -> None:
        s.bytes_received += acct[0]
        s.bytes_sent += acct[1]


def _settle(fut: asyncio.Future, outcome: SegmentDone | BaseException) -> None:
    if not fut.done():
        fut.set_result(outcome)


class _LoopReplies:
    """Hands the engine thread's outcomes to one event loop: one wake-up per tick's replies, not per Append (the
    engine's in-process fan-out, Engine.deliver, hands a tick's outcomes for one loop over in one `settle_many`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.lock = loop, threading.Lock()
        self.pending: list = []

    def waiter(self, fut: asyncio.Future) -> _Resolver:
        return _Resolver(self, fut)

    def settle_many(self, pairs) -> None:
        """(Engine thread.) Outcomes for several of this loop's waiters, (waiter, outcome) each: one wake-up."""
        with self.lock:
            first = not self.pending
            self.pending.extend((w.fut, outcome) for w, outcome in pairs)
        if first:
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for fut, outcome in pending:
            _settle(fut, outcome)


class _Resolver:
    """An Append's waiter in one event loop's `_LoopReplies` (`loop_replies`: Engine.deliver groups by it)."""

    __slots__ = ("loop_replies", "fut")

    def __init__(self, replies: _LoopReplies, fut: asyncio.Future) -> None:
        self.loop_replies, self.fut = replies, fut

    def __call__(self, outcome) -> None:  # an outcome handed out alone
        self.loop_replies.settle_many(((self, outcome),))


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)
