"""Front-end processes and one engine process, connected over ZeroMQ on a local ipc socket.

Python gRPC costs real CPU per message, and in one process that work competes with the engine for the GIL. With
`coexit serve --frontends N`, N processes serve gRPC on the same port (SO_REUSEPORT spreads connections over
them) and forward every stateful call to one engine process, which owns the model, the KV pool, the sessions and
the scheduler (a LocalBackend). A session therefore lives in the engine process and can be resumed through any
front end.

Wire: a DEALER per front end, a ROUTER in the engine. A request is [header, *payload]: the header a pickled
(request id, method, args) tuple from a trusted peer on a socket only this user can open, the payload the raw
bytes of a rows tensor. A reply is [header, *payload] with (request id, ok, result) and logits bytes when asked.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import time

import grpc
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
    dtype, shape = meta
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, dtype)).view(shape)


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
        return await self._call("append", sid, first, meta, want_token, sampling, top_k, want_logits, acct,
                                list(drafts), fill, payload=[data])

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

    async def handle(ident, header, payload) -> None:
        rid, method, args = pickle.loads(header.buffer)
        extra = []
        try:
            if method == "hello":
                result = backend.info.to_dict()
            elif method == "append":
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

    sweeper = loop.create_task(backend.sweep_forever())
    tasks: set[asyncio.Task] = set()
    try:
        while True:
            ident, header, *payload = await sock.recv_multipart(copy=False)
            task = loop.create_task(handle(ident, header, payload))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        sweeper.cancel()
        sock.close(0)
        ctx.term()
