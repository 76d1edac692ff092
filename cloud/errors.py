"""Service errors and the interceptor that maps exceptions to gRPC status codes (and checks the auth token).

Handlers raise ServiceError(code, message). A message that does not decode as protobuf is INVALID_ARGUMENT, not an
internal error. Client faults are logged at most once per `FaultLog.every_s` seconds per peer, with a count, so a
hostile client cannot fill the disk; anything unexpected becomes INTERNAL with a short message, is logged with its
traceback, and never takes the server down. Every string a client sent that an error message repeats is cut with
`clip`.
"""

from __future__ import annotations

import contextvars
import logging
import time

import grpc
from google.protobuf.message import DecodeError

log = logging.getLogger("coexit.cloud")

PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
IDENTITY: contextvars.ContextVar[str] = contextvars.ContextVar("coexit_identity", default="")  # set per call


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def clip(text: str, limit: int = 64) -> str:
    """A client-supplied string as an error message may repeat it: at most `limit` characters, repr-quoted."""
    text = str(text)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"… ({len(text)} characters)"


class FaultLog:
    """Client faults, logged at most once per `every_s` seconds per peer with how many there were."""

    def __init__(self, every_s: float = 10.0, max_peers: int = 4096) -> None:
        self.every_s, self.max_peers = every_s, max_peers
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def client_fault(self, peer: str, code: grpc.StatusCode, message: str) -> None:
        now = time.monotonic()
        n = self._count.get(peer, 0) + 1
        if now - self._last.get(peer, -1e18) >= self.every_s:
            log.info("client %s: %s: %s (%d client error(s) from this peer since the last report)",
                     peer, code.name, message[:200], n)
            self._last[peer], self._count[peer] = now, 0
            if len(self._last) > self.max_peers:  # forget peers quiet for a whole period
                for p in [p for p, t in self._last.items() if now - t >= self.every_s]:
                    self._last.pop(p, None)
                    self._count.pop(p, None)
        else:
            self._count[peer] = n


class _Undecodable:
    """What the request deserializer returns for bytes that are not a valid message (raising there would turn
    into an internal error inside grpc)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserializer):
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except (DecodeError, ValueError, TypeError, RuntimeError) as exc:
            return _Undecodable(f"{type(exc).__name__}: {str(exc)[:100]}")

    return parse


def checked(request):
    if isinstance(request, _Undecodable):
        raise invalid(f"the message is not a valid coexit.v1 protobuf ({request.reason}); build it from "
                      f"proto/coexit/v1/coexit.proto")
    return request


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, faults: FaultLog) -> None:
    if isinstance(exc, ServiceError):
        faults.client_fault(context.peer() or "?", exc.code, exc.message)
        await context.abort(exc.code, exc.message)
    log.exception("internal error", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal server error: {type(exc).__name__}: {str(exc)[:200]}")


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps ServiceError / unexpected exceptions to status codes; with `auth`, requires `authorization: Bearer
    <token>` and makes the caller's identity name visible to the handler as IDENTITY."""

    def __init__(self, auth=None) -> None:  # cloud.auth.Auth
        self.auth = auth
        self.faults = FaultLog()

    def _identity(self, details: grpc.HandlerCallDetails) -> str | None:
        if self.auth is None or details.method.startswith(PUBLIC_PREFIXES):
            return ""
        md = dict(details.invocation_metadata or ())
        ident = self.auth.identify(str(md.get("authorization", "")))
        return None if ident is None else ident.name

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        identity = self._identity(details)

        def check(context):
            if identity is None:
                raise ServiceError(grpc.StatusCode.UNAUTHENTICATED,
                                   "missing or wrong token: send metadata 'authorization: Bearer <token>'")
            IDENTITY.set(identity)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                try:
                    check(context)
                    return await inner(checked(request), context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await _abort(context, exc, self.faults)

            return grpc.unary_unary_rpc_method_handler(unary, _tolerant(handler.request_deserializer),
                                                       handler.response_serializer)
        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            async def stream(request_iterator, context):
                try:
                    check(context)
                    # the servicer passes each streamed request through checked() itself (one generator less)
                    async for reply in inner_stream(request_iterator, context):
                        yield reply
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await _abort(context, exc, self.faults)

            return grpc.stream_stream_rpc_method_handler(stream, _tolerant(handler.request_deserializer),
                                                         handler.response_serializer)
        return handler
