"""Service errors and the interceptor that maps exceptions to gRPC status codes (and checks the auth token).

Handlers raise ServiceError(code, message); anything unexpected becomes INTERNAL with a short message, is logged
with its traceback, and never takes the server down.
"""

from __future__ import annotations

import hmac
import logging

import grpc

log = logging.getLogger("coexit.cloud")

PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, ServiceError):
        await context.abort(exc.code, exc.message)
    log.exception("internal error", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal server error: {type(exc).__name__}: {exc}")


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps ServiceError / unexpected exceptions to status codes; enforces `authorization: Bearer <token>`."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        if not self.token or details.method.startswith(PUBLIC_PREFIXES):
            return True
        md = dict(details.invocation_metadata or ())
        return hmac.compare_digest(md.get("authorization", ""), f"Bearer {self.token}")

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        authorized = self._authorized(details)

        def check(context):
            if not authorized:
                raise ServiceError(grpc.StatusCode.UNAUTHENTICATED,
                                   "missing or wrong token: send metadata 'authorization: Bearer <token>'")

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                try:
                    check(context)
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await _abort(context, exc)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            async def stream(request_iterator, context):
                try:
                    check(context)
                    async for reply in inner_stream(request_iterator, context):
                        yield reply
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await _abort(context, exc)

            return grpc.stream_stream_rpc_method_handler(stream, handler.request_deserializer,
                                                         handler.response_serializer)
        return handler
