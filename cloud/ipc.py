"""Front-end processes and one engine process, connected over ZeroMQ on a local ipc socket.

Python gRPC costs real CPU per message, and in one process that work competes with the engine for the GIL. With
`coexit serve --frontends N`, N processes serve gRPC on the same port (SO_REUSEPORT spreads connections over
them) and forward every stateful call to one engine process, which owns the model, the KV pool, the sessions and
the scheduler (a LocalBackend). A session therefore lives in the engine process and can be resumed through any
front end.

Wire: a DEALER per front end, a ROUTER in the engine. A request is [header, *payload]: the header a pickled
(request id, method, args) tuple from a trusted peer on a socket only this user can open, the payload the raw
bytes of a rows tensor. A reply is [header, *payload] with (request id, ok, result) and logits bytes when asked.

Replies to Appends that want a plain token (no logits, top logprobs or drafts) are not sent one by one: the engine
thread hands each tick's results to `PackedReplies`, which sends every front end one message per tick,
[b"P", REPLY array bytes] (request id, token, logprob, length, ...), and the front end builds the AppendOutcomes
and answers its streams. The engine process thus spends a few numpy operations per tick on replies, not a
coroutine, a pickle and a send per Append.

The same holds on the way in. A front end does not send plain-token Appends one by one: those its event loop
receives in one turn go out together as one message, [b"A", pickled entries (request id, session, first position,
rows' dtype and shape, sampling, accounting, fill, byte count), every entry's rows bytes back to back], and the
engine process queues them all in one pass over that message (`AppendBatch`, one task per message), instead of a
receive, a task, a pickle and a tensor per Append. Every other call is sent after the Appends queued before it,
so a front end's calls reach the engine in the order they were made.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import pickle
import time

import grpc
import numpy as np
import torch
import zmq
import zmq.asyncio

from cloud.backend import AppendOutcome, LocalBackend, ModelInfo, OpenArgs, SessionHandle
from cloud.errors import ServiceError

log = logging.getLogger("coexit.cloud")


def _tensor_bytes(t: torch.Tensor) -> tuple[tuple, bytes]:
    t = t.contiguous()
    return (str(t.dtype).removeprefix("torch."), tuple(t.shape)), t.view(torch.uint8).numpy().tobytes()


def _tensor_from(meta: tuple, data) -> torch.Tensor:
    return _view(bytearray(data), meta, 0, len(data))


def _view(buf: bytearray, meta: tuple, offset: int, nbytes: int) -> torch.Tensor:
    """The tensor meta = (dtype name, shape) held in buf[offset:offset + nbytes], sharing buf's memory: a numpy view
    where numpy has the dtype (a third of the time of torch's own views), torch's otherwise (bfloat16)."""
    dtype, shape = meta
    if nbytes == 0:
        return torch.empty(shape, dtype=getattr(torch, dtype))
    as_np = _NUMPY.get(dtype)
    if as_np is not None:
        return torch.from_numpy(np.frombuffer(buf, as_np, nbytes // as_np.itemsize, offset).reshape(shape))
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset).view(getattr(torch, dtype)).view(shape)


_CODE_SHIFT, _RID_MASK = 48, (1 << 48) - 1  # PackedWaiter.key: the front end's code above, the request id below
REPLY = np.dtype([("rid", "<i8"), ("token", "<i8"), ("logprob", "<f8"), ("length", "<i8"), ("layer_tokens", "<i8"),
                  ("compute_s", "<f8"), ("queue_s", "<f8"), ("exit_layer", "<i4"), ("rows_filled", "<i4")])
PACKED = b"P"
APPENDS = b"A"  # a front end's batch of plain-token Appends (RemoteBackend, AppendBatch)
_ALIGN = 8  # each entry's rows start at a multiple of this in an APPENDS message (any dtype can view them)
_NUMPY = {name: np.dtype(name) for name in ("float32", "float16", "float64", "int64", "int32")}
_ROW = np.dtype((np.void, REPLY.itemsize))  # a REPLY row as opaque bytes


class PackedWaiter:
    """The engine's waiter for an Append whose reply goes out packed with its tick's others. key: its front end's
    code (PackedReplies.fronts) above bit 48, its request id below, read for a whole tick in one pass."""

    __slots__ = ("replies", "front", "rid", "session", "key")

    def __init__(self, replies: PackedReplies, front: bytes, rid: int, session=None, code: int = 0) -> None:
        self.replies, self.front, self.rid, self.session = replies, front, rid, session
        self.key = code << _CODE_SHIFT | rid

    def __call__(self, outcome) -> None:  # an outcome handed out alone (a rollback, an error, a closed session)
        self.replies.flush(None, [(self, outcome)])


class PackedReplies:
    """The engine side of the front ends' replies: `flush` is the engine's fan-out (Engine.fan_out). It packs a
    tick's plain-token answers into one REPLY array per front end; other answers go alone, pickled as before.
    `send(front, frames)` runs on the event loop that owns the socket (or directly when loop is None)."""

    def __init__(self, sock, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.sock, self.loop = sock, loop
        self.fronts: list[bytes] = []  # front ends by code, in the order they were first seen
        self._codes: dict[bytes, int] = {}

    def waiter(self, front: bytes, rid: int, session=None) -> PackedWaiter:
        return self.waiters(front)(rid, session)

    def waiters(self, front: bytes):
        """A maker of `front`'s waiters, (rid, session) -> PackedWaiter (a message's entries share its front end)."""
        code = self._codes.get(front)
        if code is None:
            code = self._codes[front] = len(self.fronts)
            self.fronts.append(front)
        return functools.partial(PackedWaiter, self, front, code=code)

    def flush(self, steady, finished: list) -> None:
        from cloud.engine.engine import Engine

        rows, alone = [], []  # rows: (front code, rid, token, logprob, length, layer_tokens, ...)
        packed = codes = None  # the steady rows' REPLY array, and each row's front end's code
        if steady is not None and not steady.retired:
            packed, codes = self._pack_steady(steady)
        if steady is not None and packed is None:  # some waiters are not packed, or sessions closed meanwhile
            out, others = steady.out, []
            for i, (s, seg) in enumerate(zip(steady.sessions, steady.segments)):
                w = seg.waiter
                if type(w) is PackedWaiter and not s.retired:
                    rows.append((w.key >> _CODE_SHIFT, w.rid, out.tokens[i], out.logprobs[i], seg.last,
                                 steady.layer_tokens, steady.compute_s, steady.queue_s[i], s.runner.stop, 0))
                else:
                    others.append(i)
            if others:
                Engine.deliver(None, list(steady.outcomes(others)))
        for w, outcome in finished:
            if type(w) is not PackedWaiter:
                if w is not None:
                    w(outcome)
                continue
            t = getattr(outcome, "token", None)
            if t is not None and not t.top and not outcome.verdicts:
                length = w.session.length if w.session is not None else 0
                rows.append((w.key >> _CODE_SHIFT, w.rid, t.token_id, t.logprob, length, outcome.layer_tokens,
                             outcome.compute_s, outcome.queue_s, t.exit_layer, outcome.rows_filled))
            else:
                alone.append((w, outcome))
        if rows:  # after the steady rows, in the same message per front end
            more = np.array([r[1:] for r in rows], dtype=REPLY)
            more_codes = np.array([r[0] for r in rows], dtype=np.int64)
            if packed is None:
                packed, codes = more, more_codes
            else:
                packed = np.concatenate([packed.view(_ROW), more.view(_ROW)])
                codes = np.concatenate([codes, more_codes])
        msgs = self._by_front(packed, codes) if packed is not None else []
        for w, outcome in alone:
            msgs.append([w.front, pickle.dumps(self._reply(w, outcome))])
        if msgs:
            self._send(msgs)

    @staticmethod
    def _pack_steady(steady) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The decode rows as one REPLY array, filled column by column, and each row's front end's code; (None,
        None) when a row's waiter is not a PackedWaiter."""
        keys, out, n = steady.keys, steady.out, len(steady.keys)
        if n == 0 or keys.min() < 0:  # an in-process waiter (or none): answered one by one
            return None, None
        arr = np.empty(n, dtype=REPLY)
        arr["rid"] = keys & _RID_MASK
        arr["token"] = out.tokens
        arr["logprob"] = out.logprobs
        arr["length"] = out.lengths
        arr["layer_tokens"] = steady.layer_tokens
        arr["compute_s"] = steady.compute_s
        arr["queue_s"] = steady.queue_s
        arr["exit_layer"] = steady.sessions[0].runner.stop
        arr["rows_filled"] = 0
        return arr, keys >> _CODE_SHIFT

    def _by_front(self, arr: np.ndarray, codes: np.ndarray) -> list:
        """One [front, PACKED, rows] message per front end, its rows in arr's order (REPLY rows, or their bytes)."""
        lo, hi = int(codes.min()), int(codes.max())
        if lo == hi:
            return [[self.fronts[lo], PACKED, arr.tobytes()]]
        rows = arr.view(_ROW)  # numpy selects opaque rows several times faster than structured ones
        present = np.flatnonzero(np.bincount(codes - lo)) + lo
        return [[self.fronts[c], PACKED, rows[codes == c].tobytes()] for c in present.tolist()]

    @staticmethod
    def _reply(w: PackedWaiter, outcome) -> tuple:
        from cloud.backend import AppendOutcome

        if isinstance(outcome, ServiceError):
            return w.rid, False, (outcome.code.name, outcome.message)
        if isinstance(outcome, BaseException):
            return w.rid, False, (None, f"{type(outcome).__name__}: {outcome}")
        return w.rid, True, AppendOutcome.of(w.session.length if w.session is not None else 0, outcome)

    def _send(self, msgs: list) -> None:
        if self.loop is None:
            for m in msgs:
                self.sock.send_multipart(m, copy=False)
            return

        async def send() -> None:
            for m in msgs:
                await self.sock.send_multipart(m, copy=False)

        asyncio.run_coroutine_threadsafe(send(), self.loop)


def unpack_replies(data) -> list[tuple[int, object]]:
    """(request id, AppendOutcome) of each row of a packed reply message."""
    from cloud.backend import AppendOutcome

    return [(rid, AppendOutcome(length, True, token, logprob, exit_layer, layer_tokens=lt, compute_s=cs,
                                queue_s=qs, rows_filled=filled))
            for rid, token, logprob, length, lt, cs, qs, exit_layer, filled
            in np.frombuffer(data, dtype=REPLY).tolist()]


class RemoteBackend:
    """The backend a front-end process uses: the same calls as LocalBackend, answered by the engine process."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self.info: ModelInfo | None = None
        self._outbox: list[tuple] = []  # plain-token Appends of this event-loop turn, sent as one APPENDS message
        self._outbox_data: list[bytes] = []
        self.sent_messages = self.sent_appends = 0  # APPENDS messages sent, and the Appends they carried

    async def connect(self, timeout_s: float = 600.0) -> ModelInfo:
        self._reader = asyncio.get_running_loop().create_task(self._read())
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.info = ModelInfo(**await asyncio.wait_for(self._call("hello"), 2.0))
                return self.info
            except asyncio.TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no engine answered at {self.address}") from None

    async def _read(self) -> None:
        while True:
            header, *payload = await self.sock.recv_multipart(copy=False)
            if header.bytes == PACKED:
                for rid, out in unpack_replies(payload[0].buffer):
                    fut = self._pending.pop(rid, None)
                    if fut is not None and not fut.done():
                        fut.set_result(out)
                continue
            rid, ok, result = pickle.loads(header.buffer)
            fut = self._pending.pop(rid, None)
            if fut is None or fut.done():
                continue
            if ok:
                if isinstance(result, AppendOutcome) and payload:
                    result.logits = _tensor_from(result.logits, payload[0].buffer)
                fut.set_result(result)
            else:
                code, message = result
                fut.set_exception(ServiceError(grpc.StatusCode[code], message) if code else RuntimeError(message))

    async def _call(self, method: str, *args, payload: list[bytes] = ()):
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._send_appends()  # the Appends queued before this call go first
        await self.sock.send_multipart([pickle.dumps((rid, method, args)), *payload], copy=False)
        try:
            return await fut
        finally:
            self._pending.pop(rid, None)

    async def open(self, args: OpenArgs) -> SessionHandle:
        return await self._call("open", args)

    async def append(self, sid, first, rows, want_token, sampling, top_k, want_logits, acct, drafts=(),
                     fill=None) -> AppendOutcome:
        meta, data = _tensor_bytes(rows)
        if not (want_token and not top_k and not want_logits and not drafts):
            return await self._call("append", sid, first, meta, want_token, sampling, top_k, want_logits, acct,
                                    list(drafts), fill, payload=[data])
        # a plain token: queued with this loop turn's others, sent as one message when the turn ends
        rid = next(self._ids)
        loop = asyncio.get_running_loop()
        fut = self._pending[rid] = loop.create_future()
        if not self._outbox:
            loop.call_soon(self._send_appends)
        self._outbox.append((rid, sid, first, meta, sampling, acct, fill, len(data)))
        self._outbox_data += (data, bytes(-len(data) % _ALIGN))
        try:
            return await fut
        finally:
            self._pending.pop(rid, None)

    def _send_appends(self) -> None:
        if not self._outbox:
            return
        entries, data = self._outbox, self._outbox_data
        self._outbox, self._outbox_data = [], []
        self.sent_messages += 1
        self.sent_appends += len(entries)
        self.sock.send_multipart([APPENDS, pickle.dumps(entries), b"".join(data)], copy=False)

    async def rollback(self, sid: str, length: int, acct: tuple[int, int]) -> int:
        return await self._call("rollback", sid, length, acct)

    async def close(self, sid: str, acct: tuple[int, int]) -> tuple[int, int]:
        return await self._call("close", sid, acct)

    async def detach(self, sid: str, acct: tuple[int, int]) -> None:
        return await self._call("detach", sid, acct)

    def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.sock.close(0)
        self.ctx.term()


def _alike(buf: bytearray, entries: list) -> torch.Tensor | None:
    """When every entry's rows have the same dtype and shape (as a front end's decode rows do) and lie back to back,
    all of them as one view (entries, *shape) of buf; else None."""
    shapes = {(meta, nbytes) for *_, meta, _, _, _, nbytes in entries}
    if len(shapes) != 1:
        return None
    ((dtype, shape), nbytes), = shapes
    if nbytes % _ALIGN or dtype not in _NUMPY or not nbytes:
        return None
    return _view(buf, (dtype, (len(entries), *shape)), 0, len(entries) * nbytes)


class AppendBatch:
    """The engine side of an APPENDS message: every entry queued in one pass, its rows a view of one copy of the
    message's bytes, its reply packed with its tick's others (`PackedReplies.waiter`). An entry that is refused
    (a closed session, a gap, ...) or answered at once (discarded rows) is answered alone; the others are queued
    all the same."""

    def __init__(self, backend: LocalBackend, packed: PackedReplies) -> None:
        self.backend, self.packed = backend, packed

    def submit(self, front: bytes, entries, data) -> list[tuple]:
        """Queue the entries of one message from `front`; returns the replies to send now, (rid, ok, result)."""
        backend = self.backend
        sessions, segment, waiter = backend.manager.sessions, backend.segment, self.packed.waiters(front)
        entries = pickle.loads(entries)
        buf = bytearray(data)
        now, queued, rids, offset = [], [], [], 0
        every = _alike(buf, entries)
        every = every.unbind(0) if every is not None else None  # (one call for the entries' views)
        for i, (rid, sid, first, meta, sampling, acct, fill, nbytes) in enumerate(entries):
            rows = every[i] if every is not None else _view(buf, meta, offset, nbytes)
            offset += nbytes + -nbytes % _ALIGN
            s = sessions.get(sid)
            if s is None:
                exc = backend.missing()
                now.append((rid, False, (exc.code.name, exc.message)))
                continue
            queued.append((s, segment(s, first, rows, True, sampling, 0, acct, (), fill, waiter(rid, s))))
            rids.append(rid)
        for rid, (s, _), result in zip(rids, queued, backend.manager.submit_many(queued)):
            if result is True:  # queued: answered with its tick's others
                continue
            if result is False:  # discarded (after a rejected draft): answered now
                now.append((rid, True, AppendOutcome(s.length, discarded=True)))
            elif isinstance(result, ServiceError):
                now.append((rid, False, (result.code.name, result.message)))
            else:  # a server fault: the front end answers INTERNAL
                log.error("engine call append failed", exc_info=result)
                now.append((rid, False, (None, f"{type(result).__name__}: {result}")))
        return now


async def serve_engine(backend: LocalBackend, address: str) -> None:
    """The engine process's loop: answer front ends' calls with `backend` until cancelled."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    if address.startswith("ipc://"):
        old = os.umask(0o077)  # only this user may connect
        try:
            sock.bind(address)
        finally:
            os.umask(old)
    else:
        sock.bind(address)
    loop = asyncio.get_running_loop()
    packed = PackedReplies(sock, loop)
    backend.engine.fan_out = packed.flush

    async def handle(ident, header, payload) -> None:
        rid, method, args = pickle.loads(header.buffer)
        extra = []
        try:
            if method == "hello":
                result = backend.info.to_dict()
            elif method == "append":  # one that is not a plain token (those come in APPENDS messages)
                sid, first, meta, *rest = args
                result = await backend.append(sid, first, _tensor_from(meta, payload[0].buffer), *rest)
                if result.logits is not None:
                    meta, data = _tensor_bytes(result.logits)
                    result.logits, extra = meta, [data]
            else:
                result = await getattr(backend, method)(*args)
            reply = (rid, True, result)
        except ServiceError as exc:
            reply = (rid, False, (exc.code.name, exc.message))
        except Exception as exc:  # a server fault: the front end answers INTERNAL
            log.exception("engine call %s failed", method)
            reply = (rid, False, (None, f"{type(exc).__name__}: {exc}"))
        await sock.send_multipart([ident, pickle.dumps(reply), *extra], copy=False)

    batch = AppendBatch(backend, packed)

    async def handle_appends(ident, entries, data) -> None:
        for reply in batch.submit(bytes(ident.bytes), entries.buffer, data.buffer):
            await sock.send_multipart([ident, pickle.dumps(reply)], copy=False)

    sweeper = loop.create_task(backend.sweep_forever())
    tasks: set[asyncio.Task] = set()
    try:
        while True:
            ident, header, *payload = await sock.recv_multipart(copy=False)
            if len(payload) == 2 and header.bytes == APPENDS:  # (a task too: calls are handled in arrival order)
                task = loop.create_task(handle_appends(ident, *payload))
            else:
                task = loop.create_task(handle(ident, header, payload))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        sweeper.cancel()
        sock.close(0)
        ctx.term()
