"""The HTTP/1 health side port for load balancers (`coexit serve --health-http-port P`): `GET /healthz` answers
200 `SERVING` while the server takes sessions and 503 `NOT_SERVING` once it drains (SIGTERM), from the same state
that sets the gRPC health service. HAProxy 2.6 has no gRPC health check (`check port P check-proto h1` uses this);
Kubernetes may use either. Any other path is 404. Plain asyncio: one short request per connection."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def serve_health_http(host: str, port: int, serving: Callable[[], bool],
                            reuse_port: bool = False) -> asyncio.AbstractServer:
    """Start answering on host:port; `serving()` says whether the server takes new sessions."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            if path.split(b"?")[0] in (b"/healthz", b"/"):
                status, body = ("200 OK", b"SERVING\n") if serving() else ("503 Service Unavailable", b"NOT_SERVING\n")
            else:
                status, body = "404 Not Found", b"not found: GET /healthz\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, reuse_port=reuse_port or None)
