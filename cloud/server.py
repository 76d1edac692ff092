"""Building and running the cloud gRPC server: the Coexit service, grpc.health.v1, reflection, the status/auth
interceptor, optional TLS, and a background sweeper for idle sessions. `ServerThread` runs one in a background
thread (tests, benchmarks, the demo)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import coexit
from cloud.errors import StatusInterceptor
from cloud.service import CoexitService
from cloud.sessions import Limits
from coexit.v1 import coexit_pb2 as pb
from coexit.v1 import coexit_pb2_grpc as pb_grpc

log = logging.getLogger("coexit.cloud")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coexit"].full_name


def load_model(model_dir: str | Path, deep_only: bool = False, dtype=None) -> coexit.EarlyExitLM:
    """The whole model by default (so the cloud-only baseline works); deep_only keeps just [split, L).
    dtype None: fp32 on a CPU (bf16 matmuls are several times slower there), the file's dtype on a GPU."""
    import torch

    config = coexit.read_config(model_dir)
    layers = (config.split_layer, config.num_hidden_layers) if deep_only else None
    on_gpu = torch.cuda.is_available()
    if dtype is None and not on_gpu:
        dtype = torch.float32
    return coexit.load(model_dir, layers=layers, dtype=dtype, device="cuda" if on_gpu else "cpu")


async def start_server(model: coexit.EarlyExitLM, port: int = 0, host: str = "127.0.0.1",
                       limits: Limits | None = None, token: str | None = None,
                       tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.aio.Server, int, CoexitService]:
    limits = limits or Limits()
    service = CoexitService.local(model, limits)
    transport_limit = 2 * limits.max_message_bytes  # oversize below this gets INVALID_ARGUMENT from us
    server = grpc.aio.server(interceptors=[StatusInterceptor(token)], options=[
        ("grpc.max_receive_message_length", transport_limit), ("grpc.max_send_message_length", transport_limit)])
    pb_grpc.add_CoexitServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    if tls is not None:
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
    else:
        bound = server.add_insecure_port(address)
    await server.start()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    async def sweep():
        while True:
            await asyncio.sleep(max(0.05, min(30.0, limits.idle_ttl_s / 2)))
            service.backend.sweep()

    server._coexit_sweeper = asyncio.get_running_loop().create_task(sweep())
    return server, bound, service


class ServerThread:
    """A real gRPC server on a loopback port, run on its own event loop in a background thread."""

    def __init__(self, model: coexit.EarlyExitLM, port: int = 0, limits: Limits | None = None,
                 token: str | None = None) -> None:
        self.model, self.requested_port, self.limits, self.token = model, port, limits, token
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="coexit-server")
        self.port = 0
        self.service: CoexitService | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            start_server(self.model, self.requested_port, limits=self.limits, token=self.token), self.loop)
        self.server, self.port, self.service = fut.result(timeout=30)
        return self

    def stop(self) -> None:
        async def _stop():
            self.server._coexit_sweeper.cancel()
            await self.server.stop(grace=None)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if self.service is not None:
            self.service.stop()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def serve_forever(model_dir: str, port: int, host: str, limits: Limits, token: str | None,
                        deep_only: bool, tls_files: tuple[str, str] | None, metrics_port: int = 0) -> None:
    model = load_model(model_dir, deep_only=deep_only)
    tls = None
    if tls_files:
        tls = (Path(tls_files[0]).read_bytes(), Path(tls_files[1]).read_bytes())
    server, bound, service = await start_server(model, port, host, limits, token, tls)
    if metrics_port:
        mport = service.engine.metrics.serve(metrics_port, host)
        print(f"coexit cloud metrics on http://{host}:{mport}/metrics", flush=True)
    c = model.config
    print(f"coexit cloud serving {model_dir} on {host}:{bound} (layers [{model.start}, {model.stop}), split "
          f"{c.split_layer}, fingerprint {model.fingerprint[:16]}…)", flush=True)
    await server.wait_for_termination()
