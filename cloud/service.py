"""The coexit.v1.Coexit servicer: Info and the per-session bidirectional stream.

Protobuf is converted to tensors here and nowhere deeper. The servicer never computes: an Append is validated
(before any state changes, so a refused Append leaves its session exactly as it was), queued on the engine, and
awaited; the engine thread batches every session's rows into one pass per tick.
"""

from __future__ import annotations

import asyncio
import logging
import math

import grpc
import torch

import coexit
from cloud.engine.engine import Engine, SegmentDone
from cloud.engine.kv_pool import KVPool
from cloud.engine.scheduler import Segment
from cloud.errors import ServiceError, invalid
from cloud.sessions import CloudSession, Limits, SessionManager, check_rows
from coexit.v1 import coexit_pb2 as pb
from coexit.v1 import coexit_pb2_grpc as pb_grpc
from coexit.v1.convert import ENCODING_CODES, encoding_name, sampling_from_proto, tensor_from_proto, tensor_to_proto

log = logging.getLogger("coexit.cloud")


class CoexitService(pb_grpc.CoexitServicer):
    def __init__(self, model: coexit.EarlyExitLM, limits: Limits) -> None:
        self.model, self.config, self.limits = model, model.config, limits
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        pool = KVPool.from_budget(self.config, limits.kv_budget_bytes, limits.block_size, p.dtype, p.device)
        self.engine = Engine(model, pool, limits.rows_per_tick)
        self.manager = SessionManager(model, limits, self.engine)

    def stop(self) -> None:
        self.engine.stop()

    # ---- Info ----------------------------------------------------------------------------------------------
    def info(self) -> pb.InfoReply:
        c, lim = self.config, self.limits
        return pb.InfoReply(
            fingerprint=self.model.fingerprint, split_layer=c.split_layer, num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size, vocab_size=c.vocab_size, exit_layers=list(c.exit_layers),
            encodings=sorted(ENCODING_CODES.values()), serves_tokens=self.manager.serves_tokens,
            version=coexit.__version__,
            limits=pb.Limits(max_sessions=lim.max_sessions, kv_budget_bytes=lim.kv_budget_bytes,
                             max_length=self.manager.max_length_cap, max_rows_per_append=lim.max_rows_per_append,
                             max_message_bytes=lim.max_message_bytes, idle_ttl_s=lim.idle_ttl_s))

    async def Info(self, request, context):
        return self.info()

    # ---- Session -------------------------------------------------------------------------------------------
    async def Session(self, request_iterator, context):
        session: CloudSession | None = None
        closed = False
        try:
            async for req in request_iterator:
                size = req.ByteSize()
                kind = req.WhichOneof("msg")
                if size > self.limits.max_message_bytes:
                    raise invalid(f"message of {size} bytes exceeds max_message_bytes {self.limits.max_message_bytes}"
                                  f"; split the rows over several Appends")
                if kind == "open":
                    if session is not None:
                        raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "this stream already opened a session")
                    session, reply = self._open(req.open)
                elif session is None:
                    raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                       f"the first message of a Session stream must be Open, got {kind}")
                elif kind == "append":
                    reply = await self._append(session, req.append)
                elif kind == "close":
                    reply = pb.SessionReply(closed=pb.CloseReply(bytes_received=session.bytes_received + size,
                                                                 bytes_sent=session.bytes_sent))
                    self.manager.close(session)
                    closed = True
                    yield reply
                    return
                else:
                    raise invalid("empty SessionRequest: set open, append or close")
                session.bytes_received += size
                session.bytes_sent += reply.ByteSize()
                self.manager.touch(session)
                yield reply
        finally:
            if session is not None and not closed:
                self.manager.detach(session)

    def _open(self, req: pb.OpenRequest) -> tuple[CloudSession, pb.SessionReply]:
        if req.fingerprint != self.model.fingerprint:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"model fingerprint mismatch: the edge has {req.fingerprint[:16] or '(none)'}…, this "
                               f"server serves {self.model.fingerprint[:16]}…; load the same checkpoint on both sides")
        if req.resume_id:
            session = self.manager.resume(req.resume_id)
            return session, pb.SessionReply(opened=pb.OpenReply(session_id=session.id, length=session.length,
                                                                resumed=True))
        try:
            encoding = encoding_name(req.encoding or pb.FP32)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        cloud_exits = {int(e.layer): float(e.threshold) for e in req.cloud_exits}
        session = self.manager.open(int(req.max_length), encoding, req.input == pb.TOKENS, req.stateless,
                                    cloud_exits)
        return session, pb.SessionReply(opened=pb.OpenReply(session_id=session.id, length=0, resumed=False))

    def _decode_rows(self, session: CloudSession, req: pb.AppendRequest) -> torch.Tensor:
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
            if int(ids.max()) >= self.config.vocab_size:
                raise invalid(f"token id {int(ids.max())} is outside the vocabulary of {self.config.vocab_size}")
            return ids.to(self.device)
        try:
            rows = tensor_from_proto(req.hidden)
        except ValueError as exc:
            raise invalid(f"malformed hidden tensor: {exc}") from None
        check_rows(rows, self.config.hidden_size)
        return rows.to(device=self.device, dtype=self.dtype)

    async def _append(self, session: CloudSession, req: pb.AppendRequest) -> pb.SessionReply:
        x = self._decode_rows(session, req)
        try:
            sampling = sampling_from_proto(req.sampling)
        except ValueError as exc:
            raise invalid(f"bad sampling parameters: {exc}") from None
        if not math.isfinite(sampling.temperature):
            raise invalid("sampling temperature must be finite")
        loop = asyncio.get_running_loop()
        fut = loop.create_future() if req.want_token else None

        def resolve(outcome) -> None:  # engine thread
            loop.call_soon_threadsafe(_settle, fut, outcome)

        segment = Segment(int(req.first_position), x, req.want_token, sampling, int(req.top_logprobs),
                          waiter=resolve if fut is not None else None)
        self.manager.submit(session, x, int(req.first_position), segment)
        if fut is None:  # rows are queued; the engine computes them in the background, chunk by chunk
            return pb.SessionReply(appended=pb.AppendReply(length=session.length))
        done = await fut
        if isinstance(done, BaseException):
            raise done
        result = done.token
        reply = pb.AppendReply(length=session.length, layer_tokens=done.layer_tokens,
                               compute_us=int(done.compute_s * 1e6))
        if result is not None:
            reply.has_token = True
            reply.token_id, reply.logprob, reply.exit_layer = result.token_id, result.logprob, result.exit_layer
            reply.top.extend(pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in result.top)
            if req.want_logits:
                reply.logits.CopyFrom(tensor_to_proto(result.logits[None].float(), "fp32"))
        return pb.SessionReply(appended=reply)


def _settle(fut: asyncio.Future, outcome: SegmentDone | BaseException) -> None:
    if not fut.done():
        fut.set_result(outcome)
