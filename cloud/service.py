"""The coexit.v1.Coexit servicer: Info and the per-session bidirectional stream.

Protobuf is converted to tensors here and nowhere deeper. The servicer never computes and keeps no session state
beyond a handle per stream: an Append is validated (before any state changes, so a refused Append leaves its
session exactly as it was) and handed to the backend (cloud/backend.py), which queues it on the engine and answers
when its token is ready.
"""

from __future__ import annotations

import logging
import math

import grpc
import torch

import coexit
from cloud.backend import AppendOutcome, LocalBackend, ModelInfo, OpenArgs, SessionHandle, torch_dtype
from cloud.engine.scheduler import Draft
from cloud.errors import IDENTITY, ServiceError, checked, invalid
from cloud.sessions import Limits, check_rows
from coexit.sampling import GREEDY, check_draft
from coexit.v1 import coexit_pb2 as pb
from coexit.v1 import coexit_pb2_grpc as pb_grpc
from coexit.v1.convert import ENCODING_CODES, encoding_name, sampling_from_proto, tensor_from_proto, tensor_to_proto
from coexit.wire import SESSION_KEY_HEADER

log = logging.getLogger("coexit.cloud")

# protocol additions within v1 this server implements (InfoReply.features)
FEATURES = ("verify", "kv_fill", "queue", "heartbeat", "resume_or_open")
KV_FILL = {pb.KV_FILL_UNSPECIFIED: "exact", pb.EXACT: "exact", pb.PROPAGATE: "propagate"}


class CoexitService(pb_grpc.CoexitServicer):
    def __init__(self, backend, info: ModelInfo, limits: Limits) -> None:
        self.backend, self.model_info, self.limits = backend, info, limits
        self.dtype = torch_dtype(info.dtype)
        self.health = None  # the grpc.health.v1 servicer, set by the server
        self.draining = False
        self.active_streams = 0  # Session streams open
        if isinstance(backend, LocalBackend):  # in-process: tests and tools look at the live state
            self.manager, self.engine = backend.manager, backend.engine

    def stop(self) -> None:
        self.backend.stop()

    # ---- Info ----------------------------------------------------------------------------------------------
    def info(self) -> pb.InfoReply:
        m, lim = self.model_info, self.limits
        return pb.InfoReply(
            fingerprint=m.fingerprint, split_layer=m.split_layer, num_layers=m.num_layers,
            hidden_size=m.hidden_size, vocab_size=m.vocab_size, exit_layers=list(m.exit_layers),
            encodings=sorted(ENCODING_CODES.values()), serves_tokens=m.serves_tokens,
            version=coexit.__version__, features=list(FEATURES),
            limits=pb.Limits(max_sessions=lim.max_sessions, kv_budget_bytes=lim.kv_budget_bytes,
                             max_length=m.max_length, max_rows_per_append=lim.max_rows_per_append,
                             max_message_bytes=lim.max_message_bytes, idle_ttl_s=lim.idle_ttl_s))

    async def Info(self, request, context):
        return self.info()

    # ---- Session -------------------------------------------------------------------------------------------
    def _refuse_if_draining(self) -> None:
        if self.draining:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "this server is shutting down; resume the session on "
                                                            "another server or open a new one there")

    async def Session(self, request_iterator, context):
        handle: SessionHandle | None = None
        closed = False
        acct = [0, 0]  # bytes received / sent on this stream not yet reported to the backend
        self.active_streams += 1
        try:
            async for req in request_iterator:
                req = checked(req)
                size = req.ByteSize()
                kind = req.WhichOneof("msg")
                if size > self.limits.max_message_bytes:
                    raise invalid(f"message of {size} bytes exceeds max_message_bytes {self.limits.max_message_bytes}"
                                  f"; split the rows over several Appends")
                if kind != "close":
                    self._refuse_if_draining()
                if kind == "heartbeat":  # keeps the stream open through proxies; no session state changes
                    reply = pb.SessionReply(heartbeat=pb.Heartbeat(sent_unix_ms=req.heartbeat.sent_unix_ms))
                elif kind == "open":
                    if handle is not None:
                        raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "this stream already opened a session")
                    handle = await self._open_session(req.open)
                    if log.isEnabledFor(logging.DEBUG):  # per session: debug, or it floods a busy server
                        log.debug("session %s %s (session key %s)", handle.id[:12],
                                  "resumed" if handle.resumed else "opened", _session_key(context))
                    reply = pb.SessionReply(opened=pb.OpenReply(session_id=handle.id, length=handle.length,
                                                                resumed=handle.resumed))
                elif handle is None:
                    raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                       f"the first message of a Session stream must be Open, got {kind}")
                elif kind == "append":
                    reply = await self._append(handle, req.append, (acct[0] + size, acct[1]))
                    acct = [-size, 0]  # reported with the Append; the += below adds it back
                elif kind == "rollback":
                    length = await self.backend.rollback(handle.id, int(req.rollback.length), (acct[0] + size, acct[1]))
                    acct = [-size, 0]
                    reply = pb.SessionReply(rolled_back=pb.RollbackReply(length=length))
                elif kind == "close":
                    received, sent = await self.backend.close(handle.id, (acct[0] + size, acct[1]))
                    closed = True
                    yield pb.SessionReply(closed=pb.CloseReply(bytes_received=received, bytes_sent=sent))
                    # End the stream only once the edge has finished sending: a server that ends it first makes
                    # its HTTP/2 stack reset the client's half, and HAProxy 2.6 then drops the reply before it
                    # reaches the edge. Anything after Close is ignored.
                    async for _ in request_iterator:
                        pass
                    return
                else:
                    raise invalid("empty SessionRequest: set open, append or close")
                acct[0] += size
                acct[1] += reply.ByteSize()
                yield reply
        finally:
            self.active_streams -= 1
            if handle is not None and not closed:
                await self.backend.detach(handle.id, (acct[0], acct[1]))

    async def _open_session(self, req: pb.OpenRequest) -> SessionHandle:
        """Open, or resume; with open_if_missing a resume of a session this server does not hold opens anew."""
        args = self._open_args(req)
        if not (req.resume_id and req.open_if_missing):
            return await self.backend.open(args)
        try:
            return await self.backend.open(args)
        except ServiceError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
        return await self.backend.open(self._open_args(req, fresh=True))

    def _open_args(self, req: pb.OpenRequest, fresh: bool = False) -> OpenArgs:
        m = self.model_info
        if req.fingerprint != m.fingerprint:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"model fingerprint mismatch: the edge has {req.fingerprint[:16] or '(none)'}…, this "
                               f"server serves {m.fingerprint[:16]}…; load the same checkpoint on both sides")
        if req.resume_id and not fresh:
            return OpenArgs(resume_id=req.resume_id, identity=IDENTITY.get())
        if req.input not in pb.InputKind.values():
            raise invalid(f"unknown input {req.input}; use HIDDEN or TOKENS")
        try:
            encoding = encoding_name(req.encoding or pb.FP32)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        if req.kv_fill not in KV_FILL:
            raise invalid(f"unknown kv_fill {req.kv_fill}; use EXACT or PROPAGATE")
        return OpenArgs("", int(req.max_length), encoding, req.input == pb.TOKENS, req.stateless,
                        {int(e.layer): float(e.threshold) for e in req.cloud_exits}, IDENTITY.get(),
                        KV_FILL[req.kv_fill])

    def _decode_rows(self, session: SessionHandle, req: pb.AppendRequest) -> torch.Tensor:
        if session.tokens_input:
            if req.HasField("hidden"):
                raise invalid("this session was opened for token ids (input TOKENS) but the Append carries hidden "
                              "rows")
            n = len(req.token_ids)
        else:
            if not req.HasField("hidden"):
                raise invalid("this session takes hidden rows (input HIDDEN) but the Append carries none")
            if req.hidden.encoding != ENCODING_CODES[session.encoding]:
                enc = req.hidden.encoding
                got = pb.Encoding.Name(enc) if enc in pb.Encoding.values() else str(enc)
                raise invalid(f"encoding mismatch: the session was opened with {session.encoding} but the rows are "
                              f"{got}")
            n = req.hidden.rows
        if n > self.limits.max_rows_per_append:
            raise invalid(f"{n} rows exceed max_rows_per_append {self.limits.max_rows_per_append}; split them "
                          f"over several Appends")
        if session.tokens_input:
            ids = torch.tensor(list(req.token_ids), dtype=torch.long)
            if ids.numel() == 0:
                raise invalid("an Append must carry at least one token id")
            if int(ids.max()) >= self.model_info.vocab_size:
                raise invalid(f"token id {int(ids.max())} is outside the vocabulary of {self.model_info.vocab_size}")
            return ids
        try:
            rows = tensor_from_proto(req.hidden)
        except ValueError as exc:
            raise invalid(f"malformed hidden tensor: {exc}") from None
        check_rows(rows, self.model_info.hidden_size)
        return rows if rows.dtype == self.dtype else rows.to(dtype=self.dtype)

    async def _append(self, handle: SessionHandle, req: pb.AppendRequest, acct: tuple[int, int]) -> pb.SessionReply:
        x = self._decode_rows(handle, req)
        try:
            sampling = sampling_from_proto(req.sampling) if req.HasField("sampling") else GREEDY
        except ValueError as exc:
            raise invalid(f"bad sampling parameters: {exc}") from None
        if not math.isfinite(sampling.temperature):
            raise invalid("sampling temperature must be finite")
        drafts = self._drafts(req, sampling.greedy)
        fill = self._fill(req, int(x.shape[0]))
        out: AppendOutcome = await self.backend.append(handle.id, int(req.first_position), x, req.want_token,
                                                       sampling, int(req.top_logprobs), req.want_logits, acct,
                                                       drafts, fill)
        reply = pb.AppendReply(length=out.length, layer_tokens=out.layer_tokens, compute_us=int(out.compute_s * 1e6),
                               discarded=out.discarded, filled_layer_rows=out.rows_filled,
                               queue_us=int(out.queue_s * 1e6))
        reply.verdicts.extend(pb.Verdict(position=p, accepted=a, token_id=t, logprob=lp)
                              for p, a, t, lp in out.verdicts)
        if out.has_token:
            reply.has_token = True
            reply.token_id, reply.logprob, reply.exit_layer = out.token_id, out.logprob, out.exit_layer
            reply.top.extend(pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in out.top)
            if req.want_logits and out.logits is not None:
                reply.logits.CopyFrom(tensor_to_proto(out.logits[None].float(), "fp32"))
        return pb.SessionReply(appended=reply)

    def _drafts(self, req: pb.AppendRequest, greedy: bool) -> list[Draft]:
        drafts = []
        for d in req.drafts:
            ids, probs = list(d.support_ids), list(d.support_probs)
            try:
                check_draft(int(d.token_id), ids, probs, self.model_info.vocab_size, greedy)
            except ValueError as exc:
                raise invalid(f"draft for position {d.position}: {exc}") from None
            drafts.append(Draft(int(d.position), int(d.token_id), tuple(ids), tuple(probs)))
        return drafts

    @staticmethod
    def _fill(req: pb.AppendRequest, n: int) -> torch.Tensor | None:
        if not req.fill_rows:
            return None
        rows = list(req.fill_rows)
        if rows != sorted(set(rows)) or rows[-1] >= n:
            raise invalid(f"fill_rows must be increasing row indices below the Append's {n} rows")
        fill = torch.zeros(n, dtype=torch.bool)
        fill[rows] = True
        return fill


def _session_key(context) -> str:
    """The edge's `x-coexit-session` metadata (what a balancer routes on), for the log only."""
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_KEY_HEADER:
            return value[:64]
    return "-"
