"""One generation of the edge SDK, whatever its mode: the edge position, the split-row history kept for replay,
and the cloud session (open, resume, append, close), with the events and counters it reports.

`Run` is the loop of collaborative, standalone, cloud-only and naive-split modes; edge/lossless.py's LosslessRun
is a Run of the same machinery with drafts in flight. EdgeClient (edge/client.py) picks the run for a mode.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import torch

from coexit.errors import ContextLengthError, UsageError
from coexit.exits import Below, ExitPolicy
from coexit.sampling import SamplingParams, sample
from coexit.v1 import coexit_pb2 as pb
from coexit.v1.convert import ENCODING_CODES, sampling_to_proto, tensor_to_proto
from edge.link import CloudError, CloudUnavailable, SessionStream

MODES = ("collaborative", "standalone", "cloud-only", "naive-split", "lossless")
KV_FILLS = {"exact": pb.EXACT, "propagate": pb.PROPAGATE}


@dataclass
class TokenEvent:
    position: int  # where the token sits in the sequence
    token_id: int
    text: str  # the text this token adds (may be "" mid-character)
    origin: str  # "edge", "cloud" or "edge-standalone" (cloud unreachable)
    exit_layer: int  # layer count whose head produced it
    logprob: float
    latency_s: float
    kind: str = "token"  # lossless with provisional=True also streams "draft" (unverified) and "retract" events


@dataclass
class Counters:
    bytes_up: int = 0
    bytes_down: int = 0
    fallbacks: int = 0  # tokens that asked the cloud
    standalone: int = 0  # tokens made on the edge because the cloud was unreachable
    exits: Counter = field(default_factory=Counter)  # exit layer -> tokens (edge and cloud heads)
    rtts_s: list[float] = field(default_factory=list)  # per fallback: edge-measured round trip
    cloud_compute_s: list[float] = field(default_factory=list)  # per fallback: server-reported compute
    cloud_layer_tokens: int = 0  # layer-row computations the cloud reported
    edge_layer_tokens: int = 0
    uploads: list[list[int]] = field(default_factory=list)  # per cloud session: positions uploaded, in order
    payload_up: int = 0  # hidden-state payload bytes (data + scales) sent
    sessions_opened: int = 0
    server_bytes: list[tuple[int, int]] = field(default_factory=list)  # per closed session: (received, sent)
    cloud_filled_rows: int = 0  # layer-rows whose KV the cloud propagated (kv_fill="propagate")
    drafts: int = 0  # lossless: drafts sent
    accepted: int = 0  # lossless: drafts the cloud accepted
    rejected: int = 0  # lossless: drafts the cloud rejected (each costs a rollback)
    wasted: int = 0  # lossless: drafts that got no verdict (they followed a rejected one)

    def merge_stream(self, s: SessionStream | None) -> None:
        if s is not None:
            self.bytes_up += s.bytes_up
            self.bytes_down += s.bytes_down
            s.bytes_up = s.bytes_down = 0


@dataclass
class Generation:
    prompt_ids: list[int]
    events: list[TokenEvent]
    text: str
    counters: Counters

    @property
    def tokens(self) -> list[int]:
        return [e.token_id for e in self.events]


class Run:
    """One generation: the edge position, the split-row history kept for replay, and the cloud session."""

    def __init__(self, client, prompt, max_new: int, sampling: SamplingParams, policy: ExitPolicy,
                 mode: str, stop_at_eos: bool) -> None:
        if mode not in MODES:
            raise UsageError(f"unknown mode {mode!r}; use one of {MODES}")
        if mode != "standalone" and client.link is None:
            raise UsageError(f"mode {mode!r} needs a cloud: pass --cloud HOST:PORT (cloud=...) of a `coexit serve`, "
                             f"or use mode standalone")
        self.c, self.mode, self.sampling, self.policy = client, mode, sampling, policy
        tok = client.tokenizer
        if tok is None and isinstance(prompt, str):
            raise UsageError("this model has no tokenizer.json, so a text prompt cannot be encoded: add the "
                             "checkpoint's tokenizer.json to the model folder, or pass token ids")
        self.prompt_ids = list(prompt) if not isinstance(prompt, str) else tok.encode(prompt, add_bos=True)
        if not self.prompt_ids:
            raise UsageError("empty prompt")
        if max_new < 1:
            raise UsageError(f"max_new_tokens must be at least 1, got {max_new}")
        limit = client.backend.max_length
        if client._info is not None and client._info.limits.max_length:  # the cloud's own limit, once it is known
            limit = min(limit, client._info.limits.max_length)
        if len(self.prompt_ids) + max_new > limit:
            raise ContextLengthError(len(self.prompt_ids), max_new, limit)
        self.max_new, self.stop_at_eos = max_new, stop_at_eos
        self.max_length = len(self.prompt_ids) + max_new
        self.counters = Counters()
        self.decoder = tok.stream() if tok is not None else None
        self.ids = list(self.prompt_ids)
        self.history = torch.empty(0)  # split-layer rows in position order: [:history_len] used, grown by doubling
        self.history_len = 0
        self.stream: SessionStream | None = None
        self.session_key = secrets.token_hex(12)  # on every stream of this generation: a balancer's stickiness key
        self.session_id = ""
        self.cloud_len = 0
        self.retry_at = 0.0
        self._compute_us = self._queue_us = 0
        self.kv_fill = client.kv_fill if mode == "collaborative" else "exact"
        self.exited_rows: set[int] = set()  # positions whose row stopped at an edge exit (kv_fill="propagate")

    # ---- cloud session -------------------------------------------------------------------------------------
    def _open(self) -> None:
        now = time.monotonic()
        if now < self.retry_at:
            raise CloudUnavailable(grpc.StatusCode.UNAVAILABLE, "cloud marked down; retrying later")
        fp = self.c.backend.fingerprint
        enc = ENCODING_CODES[self.c.encoding]
        if self.retry_at:  # coming back after an outage
            self.c.link.reconnect()
        try:
            if self.kv_fill != "exact":
                self.c.require("kv_fill", "kv_fill='propagate'")
            exits = self.c.cloud_exits if self.mode == "collaborative" else {}
            opening = pb.OpenRequest(
                fingerprint=fp, max_length=self.max_length, encoding=enc,
                input=pb.TOKENS if self.mode == "cloud-only" else pb.HIDDEN, stateless=self.mode == "naive-split",
                cloud_exits=[pb.CloudExit(layer=k, threshold=v) for k, v in sorted(exits.items())],
                kv_fill=KV_FILLS[self.kv_fill])
            reply = None
            if self.session_id and self.mode in ("collaborative", "lossless"):
                self.stream = self.c.link.stream(self.session_key, self.c.heartbeat())
                if self.c.supports("resume_or_open"):  # one round trip: resumed here, or opened anew
                    opening.resume_id, opening.open_if_missing = self.session_id, True
                    reply = self.stream.request(pb.SessionRequest(open=opening))
                else:
                    try:
                        reply = self.stream.request(pb.SessionRequest(open=pb.OpenRequest(
                            fingerprint=fp, resume_id=self.session_id)))
                    except CloudError as exc:
                        if exc.code != grpc.StatusCode.NOT_FOUND:
                            raise
                        self.counters.merge_stream(self.stream)
                if reply is not None and reply.opened.resumed:
                    self.cloud_len = reply.opened.length
                    return
            if reply is None:  # no session yet, or an older server answered NOT_FOUND
                self.stream = self.c.link.stream(self.session_key, self.c.heartbeat())
                reply = self.stream.request(pb.SessionRequest(open=opening))
        except CloudUnavailable:
            self._mark_down()
            raise
        self.session_id, self.cloud_len = reply.opened.session_id, 0
        self.counters.sessions_opened += 1
        self.counters.uploads.append([])

    def _append_request(self, first: int, hidden: torch.Tensor | None, token_ids: list[int] | None,
                        want: bool) -> pb.SessionRequest:
        req = pb.AppendRequest(first_position=first, want_token=want, sampling=sampling_to_proto(self.sampling))
        if hidden is not None:
            req.hidden.CopyFrom(tensor_to_proto(hidden, self.c.encoding))
            self.counters.payload_up += len(req.hidden.data) + len(req.hidden.scales)
            if self.kv_fill == "propagate":
                req.fill_rows.extend(i for i in range(hidden.shape[0]) if first + i in self.exited_rows)
        else:
            req.token_ids.extend(token_ids)
        return pb.SessionRequest(append=req)

    def _account(self, reply: pb.AppendReply) -> None:
        self.counters.cloud_layer_tokens += reply.layer_tokens
        self.counters.cloud_filled_rows += reply.filled_layer_rows
        self._compute_us += reply.compute_us
        self._queue_us += reply.queue_us

    def _append(self, first: int, hidden: torch.Tensor | None, token_ids: list[int] | None,
                want: bool) -> pb.AppendReply:
        reply = self.stream.request(self._append_request(first, hidden, token_ids, want)).appended
        self._account(reply)
        return reply

    def _cloud_token(self, upto: int) -> pb.AppendReply:
        """Send what the cloud lacks of positions [0, upto) and get the token for position `upto`."""
        if self.stream is None or self.stream.broken:
            self._open()
        t0, self._compute_us, self._queue_us = time.perf_counter(), 0, 0
        sent_before = self.stream.bytes_up
        try:
            if self.mode == "naive-split":
                reply = self._append(0, self._rows(0, upto), None, True)
            elif self.mode == "cloud-only":
                reply = self._append(self.cloud_len, None, self.ids[self.cloud_len:upto], True)
            else:
                first, per_append = self.cloud_len, self.c.rows_per_append()
                while True:
                    last = min(upto, first + per_append)
                    reply = self._append(first, self._rows(first, last), None, last == upto)
                    self.counters.uploads[-1].extend(range(first, last))
                    first = last
                    if first == upto:
                        break
            self.cloud_len = reply.length
        except CloudUnavailable:
            self._mark_down()
            raise
        rtt = time.perf_counter() - t0
        self.counters.rtts_s.append(rtt)
        self.counters.cloud_compute_s.append(self._compute_us / 1e6)
        self.policy.observe(rtt, self._compute_us / 1e6, self._queue_us / 1e6, self.stream.bytes_up - sent_before)
        self.counters.merge_stream(self.stream)
        return reply

    def _mark_down(self) -> None:
        """The cloud failed: drop the stream (keeping its byte counts) and retry no sooner than retry_s."""
        self.counters.merge_stream(self.stream)
        self.stream = None
        self.retry_at = time.monotonic() + self.c.retry_s

    def _rows(self, a: int, b: int) -> torch.Tensor:
        return self.history[a:b]

    # ---- edge ----------------------------------------------------------------------------------------------
    def _collect_rows(self) -> None:
        first, rows = self.c.backend.take_split_rows()
        if rows.shape[0]:
            assert first == self.history_len, "split rows must arrive in position order"
            end = self.history_len + rows.shape[0]
            if end > self.history.shape[0]:  # amortised O(1) per row, not a copy of the whole history per step
                grown = torch.empty(max(end, 2 * self.history.shape[0], 64), rows.shape[1], dtype=rows.dtype)
                if self.history_len:
                    grown[: self.history_len] = self.history[: self.history_len]
                self.history = grown
            self.history[self.history_len: end] = rows
            self.history_len = end

    def __iter__(self) -> Iterator[TokenEvent]:
        be, mode = self.c.backend, self.mode
        if mode != "cloud-only":
            be.reset()
        decide = None if mode == "naive-split" else self.policy.decide
        if mode == "standalone":  # the split exit emits regardless: only exits below it need a decision
            decide = Below(self.policy, be.split).decide
        chunk = self.c.prefill_chunk
        pos, pending = 0, self.prompt_ids
        try:
            for _ in range(self.max_new):
                t0 = time.perf_counter()
                if mode != "cloud-only":
                    while len(pending) > chunk:  # long prompts: earlier chunks need no exit decision
                        be.step(pending[:chunk], pos, None)
                        pos, pending = pos + chunk, pending[chunk:]
                    t_step = time.perf_counter()
                    res = be.step(pending, pos, decide)
                    if len(pending) == 1:  # a decode step (not a prompt chunk)
                        self.policy.observe_edge(time.perf_counter() - t_step, not res.exited)
                    self._collect_rows()
                pos += len(pending)
                event = self._token(res if mode != "cloud-only" else None, pos, t0)
                self.ids.append(event.token_id)
                yield event
                pending = [event.token_id]
                eos = self.c.tokenizer.eos_id if self.c.tokenizer else None
                if self.stop_at_eos and event.token_id == eos:
                    break
        finally:
            if mode != "cloud-only":
                self.counters.edge_layer_tokens = be.layer_tokens
            self._close()

    def _close(self) -> None:
        """Close the cloud session, keeping its byte counts and the server's own."""
        if self.stream is not None:
            closed = self.stream.close()
            self.counters.merge_stream(self.stream)
            if closed is not None:
                self.counters.server_bytes.append((closed.bytes_received, closed.bytes_sent))

    def _token(self, res, pos: int, t0: float) -> TokenEvent:
        """Make the token at position `pos` from the edge's result or the cloud."""
        if res is not None and (res.exited or self.mode == "standalone"):
            self.exited_rows.add(pos - 1)
            return self._event(pos, *self._edge_token(res, pos), "edge", t0)
        self.counters.fallbacks += 1
        try:
            reply = self._cloud_token(pos)
        except CloudUnavailable:
            if res is None:
                raise
            self.counters.standalone += 1
            self.exited_rows.add(pos - 1)
            return self._event(pos, *self._edge_token(res, pos), "edge-standalone", t0)
        self.counters.exits[reply.exit_layer] += 1
        return TokenEvent(pos, reply.token_id, self._piece(reply.token_id), "cloud", reply.exit_layer, reply.logprob,
                          time.perf_counter() - t0)

    def _edge_token(self, res, pos: int) -> tuple[int, int, float]:
        """(layer, token, logprob) the edge makes for position `pos` from a step's result: the exit that stopped the
        row, else the deepest exit (standalone mode, or the cloud is away)."""
        layer = res.depth if res.exited else max(res.exit_logits)
        logits = res.exit_logits[layer]
        if res.exited and hasattr(self.policy, "emit_logits"):  # a voting policy emits the exits' combined vote
            logits = self.policy.emit_logits(res.exit_logits, layer)
        token, logprob = sample(logits, self.sampling, position=pos)
        return layer, token, logprob

    def _event(self, pos: int, layer: int, token: int, logprob: float, origin: str, t0: float) -> TokenEvent:
        self.counters.exits[layer] += 1
        return TokenEvent(pos, token, self._piece(token), origin, layer, logprob, time.perf_counter() - t0)

    def _piece(self, token: int) -> str:
        return self.decoder.push(token) if self.decoder is not None else ""
