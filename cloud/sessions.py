"""The cloud context manager: one deep-layer KV cache per session, limits, idle TTL and LRU eviction.

A session is created on Open and owns a LayerRunner over the layers the cloud runs for it ([split, L) for hidden
states, [0, L) for token ids). Its KV memory is reserved up front (max_length x bytes per position), so the global
budget is never exceeded mid-generation. When a stream ends without Close the session is detached and can be
resumed until its idle TTL runs out; when the budget or the session count is hit, detached sessions are evicted
least-recently-used first, and only then is the request refused with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import grpc
import torch
from torch import Tensor

from cloud.errors import ServiceError, invalid
from coexit.decoding import LayerRunner, RunResult
from coexit.exits import ExitPolicy
from coexit.model import EarlyExitLM
from coexit.sampling import SamplingParams, sample, top_logprobs


@dataclass(frozen=True)
class Limits:
    max_sessions: int = 64
    kv_budget_bytes: int = 2 << 30
    max_length: int = 0  # 0: the model's max_position_embeddings
    max_rows_per_append: int = 4096
    max_message_bytes: int = 64 << 20
    idle_ttl_s: float = 300.0


@dataclass
class TokenResult:
    token_id: int
    logprob: float
    exit_layer: int
    logits: Tensor
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class CloudSession:
    id: str
    runner: LayerRunner
    encoding: str
    tokens_input: bool
    stateless: bool
    max_length: int
    reserved_bytes: int
    policy: ExitPolicy
    attached: bool = True
    last_used: float = field(default_factory=time.monotonic)
    bytes_received: int = 0
    bytes_sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def length(self) -> int:
        return self.runner.next_position

    def append(self, x: Tensor, first: int, want_token: bool, sampling: SamplingParams,
               top_k: int = 0) -> tuple[TokenResult | None, int]:
        """Add rows (hidden (n, C) or token ids (n,)) for positions [first, first + n). Returns the token for the
        position after the last row when asked, and the layer-token computations spent."""
        if self.stateless:
            if first != 0:
                raise invalid(f"a stateless session takes the whole context from position 0, got {first}")
            self.runner = LayerRunner(self.runner.model, self.runner.start, self.runner.stop,
                                      max_len=self.max_length)
        elif first != self.length:
            what = "a gap" if first > self.length else "an overlap"
            raise invalid(f"rows start at position {first} but the session holds {self.length} positions "
                          f"({what}); send positions from {self.length} on")
        n = x.shape[0]
        if first + n > self.max_length:
            raise invalid(f"positions up to {first + n} exceed this session's max_length {self.max_length}; "
                          f"open a session with a larger max_length")
        before = self.runner.layer_tokens
        if not want_token:
            if self.tokens_input:
                x = self.runner.model.embed(x[None].long())[0].detach()
            self.runner.park(x, first)
            return None, 0
        result: RunResult = self.runner.run(x, first, self.policy.decide if self.policy.thresholds else None)
        logits = result.logits if result.logits is not None else result.exit_logits[result.depth]
        token, logprob = sample(logits, sampling, position=first + n)
        top = top_logprobs(logits, top_k) if top_k else []
        return TokenResult(token, logprob, result.depth, logits, top), self.runner.layer_tokens - before


class SessionManager:
    """Creates, finds, detaches and evicts sessions. Thread-safe; the gRPC layer calls it."""

    def __init__(self, model: EarlyExitLM, limits: Limits) -> None:
        self.model, self.config = model, model.config
        self.max_length_cap = limits.max_length or self.config.max_position_embeddings
        self.limits = limits
        self.sessions: OrderedDict[str, CloudSession] = OrderedDict()  # LRU order: oldest first
        self._lock = threading.Lock()
        self.serves_tokens = model.start == 0

    @property
    def reserved_bytes(self) -> int:
        return sum(s.reserved_bytes for s in self.sessions.values())

    def sweep(self, now: float | None = None) -> int:
        """Drop detached sessions idle past the TTL; returns how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            dead = [sid for sid, s in self.sessions.items()
                    if not s.attached and now - s.last_used > self.limits.idle_ttl_s]
            for sid in dead:
                del self.sessions[sid]
        return len(dead)

    def open(self, max_length: int, encoding: str, tokens_input: bool, stateless: bool,
             cloud_exits: dict[int, float]) -> CloudSession:
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
        # the cache allocates lazily: building the runner costs no KV memory until rows arrive
        runner = LayerRunner(self.model, start, self.config.num_hidden_layers, max_len=max_length)
        need = max_length * runner.cache.bytes_per_position()
        with self._lock:
            self._make_room(need)
            sid = secrets.token_hex(12)
            session = CloudSession(sid, runner, encoding, tokens_input, stateless, max_length, need,
                                   ExitPolicy(dict(cloud_exits)))
            self.sessions[sid] = session
        return session

    def _make_room(self, need: int) -> None:
        lim = self.limits
        if need > lim.kv_budget_bytes:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"a session of this max_length needs {need / 2**20:.1f} MiB of KV, more than the "
                               f"whole budget of {lim.kv_budget_bytes / 2**20:.1f} MiB; ask for a shorter max_length")
        detached = [s for s in self.sessions.values() if not s.attached]  # LRU order
        while (len(self.sessions) >= lim.max_sessions or self.reserved_bytes + need > lim.kv_budget_bytes) \
                and detached:
            victim = detached.pop(0)
            del self.sessions[victim.id]
        if len(self.sessions) >= lim.max_sessions:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the server already serves {len(self.sessions)} sessions (max_sessions "
                               f"{lim.max_sessions}); retry later")
        if self.reserved_bytes + need > lim.kv_budget_bytes:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the KV budget is full: {self.reserved_bytes / 2**20:.1f} of "
                               f"{lim.kv_budget_bytes / 2**20:.1f} MiB reserved by active sessions, "
                               f"{need / 2**20:.1f} MiB needed; retry later or ask for a shorter max_length")

    def resume(self, sid: str) -> CloudSession:
        self.sweep()
        with self._lock:
            s = self.sessions.get(sid)
            if s is None:
                raise ServiceError(grpc.StatusCode.NOT_FOUND,
                                   f"no session {sid!r}: it expired, was evicted, or the server restarted; open a "
                                   f"new session and resend its context")
            if s.attached:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"session {sid!r} is still attached to another stream")
            s.attached = True
            s.last_used = time.monotonic()
            self.sessions.move_to_end(sid)
            return s

    def touch(self, s: CloudSession) -> None:
        with self._lock:
            s.last_used = time.monotonic()
            if s.id in self.sessions:
                self.sessions.move_to_end(s.id)

    def detach(self, s: CloudSession) -> None:
        with self._lock:
            s.attached = False
            s.last_used = time.monotonic()

    def close(self, s: CloudSession) -> None:
        with self._lock:
            self.sessions.pop(s.id, None)


def check_rows(rows: Tensor, hidden_size: int) -> None:
    if rows.shape[0] == 0:
        raise invalid("an Append must carry at least one row")
    if rows.shape[1] != hidden_size:
        raise invalid(f"hidden rows have {rows.shape[1]} columns but this model's hidden size is {hidden_size}")
    bad = ~torch.isfinite(rows).all(dim=1)
    if bool(bad.any()):
        raise invalid(f"hidden rows {bad.nonzero().flatten().tolist()[:8]} hold NaN or Inf values")
