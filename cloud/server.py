"""Building and running the cloud gRPC server in one process: the Coexit service, grpc.health.v1, reflection, the
status/auth interceptor, optional TLS, draining, and a background sweeper for idle sessions. `ServerThread` runs one
in a background thread (tests, benchmarks, the demo). The layouts over several processes (tensor-parallel ranks,
front ends in front of an engine process) are in cloud/processes.py."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import coexit
from cloud.auth import Auth
from cloud.engine.heap import freeze_startup_heap
from cloud.errors import StatusInterceptor
from cloud.service import CoexitService
from cloud.sessions import Limits
from coexit.errors import UsageError
from coexit.v1 import coexit_pb2 as pb
from coexit.v1 import coexit_pb2_grpc as pb_grpc

log = logging.getLogger("coexit.cloud")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coexit"].full_name


SERVE_DTYPES = ("auto", "float32", "bfloat16", "float16")  # `coexit serve --dtype`


def serve_dtype(name: str = "auto", on_gpu: bool = False):
    """The dtype `coexit serve --dtype name` computes in; None: the checkpoint's own. auto: the checkpoint's on a
    GPU, float32 on a CPU (bf16 matmuls are several times slower on CPUs without AMX; on one with AMX, bfloat16
    steps about 1.7x faster, bench/results/cloud_load.txt)."""
    import torch

    if name not in SERVE_DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(SERVE_DTYPES)}, got {name!r}")
    if name == "auto":
        return None if on_gpu else torch.float32
    return getattr(torch, name)


def load_model(model_dir: str | Path, deep_only: bool = False, dtype: str = "auto") -> coexit.EarlyExitLM:
    """The whole model by default (so the cloud-only baseline works); deep_only keeps just [split, L); in the
    dtype `serve_dtype(dtype)` names."""
    import torch

    config = coexit.read_config(model_dir)
    layers = (config.split_layer, config.num_hidden_layers) if deep_only else None
    on_gpu = torch.cuda.is_available()
    return coexit.load(model_dir, layers=layers, dtype=serve_dtype(dtype, on_gpu), device="cuda" if on_gpu else "cpu")


async def start_server(model: coexit.EarlyExitLM, port: int = 0, host: str = "127.0.0.1",
                       limits: Limits | None = None, auth: Auth | None = None,
                       tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.aio.Server, int, CoexitService]:
    """A server with the sessions and the engine in this process."""
    from cloud.backend import LocalBackend

    limits = with_identities(limits or Limits(), auth)
    return await serve_backend(LocalBackend(model, limits), port, host, limits, auth, tls)


async def serve_backend(backend, port: int, host: str, limits: Limits, auth: Auth | None,
                        tls: tuple[bytes, bytes] | None) -> tuple[grpc.aio.Server, int, CoexitService]:
    """gRPC over a LocalBackend (sessions and engine in this process), with its idle-session sweeper."""
    server, bound, service = await start_grpc(CoexitService(backend, backend.info, limits), port, host, limits,
                                              auth, tls)
    server._coexit_sweeper = asyncio.get_running_loop().create_task(backend.sweep_forever())
    return server, bound, service


def with_identities(limits: Limits, auth: Auth | None) -> Limits:
    return dataclasses.replace(limits, identities=auth.identities) if auth is not None else limits


async def start_grpc(service: CoexitService, port: int, host: str, limits: Limits, auth: Auth | None,
                     tls: tuple[bytes, bytes] | None, reuse_port: bool = False
                     ) -> tuple[grpc.aio.Server, int, CoexitService]:
    transport_limit = 2 * limits.max_message_bytes  # oversize below this gets INVALID_ARGUMENT from us
    server = grpc.aio.server(interceptors=[StatusInterceptor(auth)], options=[
        ("grpc.max_receive_message_length", transport_limit), ("grpc.max_send_message_length", transport_limit),
        ("grpc.so_reuseport", int(reuse_port))])
    pb_grpc.add_CoexitServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    try:
        if tls is not None:
            bound = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise UsageError(f"cannot listen on {address}: the port is in use (or {host} is not an address of this "
                         f"machine); pick another --port or stop the process that holds it")
    await server.start()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    service.health = health_servicer
    return server, bound, service


class ServerThread:
    """A real gRPC server on a loopback port, run on its own event loop in a background thread."""

    def __init__(self, model: coexit.EarlyExitLM, port: int = 0, limits: Limits | None = None,
                 token: str | None = None, auth: Auth | None = None) -> None:
        self.model, self.requested_port, self.limits = model, port, limits
        self.auth = auth or (Auth.from_token(token) if token else None)
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
            start_server(self.model, self.requested_port, limits=self.limits, auth=self.auth), self.loop)
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


def say(line: str) -> None:
    """Print one line in one write: the processes of a server (tensor-parallel ranks, the engine process and front
    ends) share a stdout, and under PYTHONUNBUFFERED print's separate writes of the text and its newline interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def stop_signals() -> list[int]:
    """The signals that stop a server: SIGTERM, SIGINT (also where the shell that started it in the background set
    it to be ignored: `kill -INT` stops every way of serving alike), and SIGHUP (the terminal closed) unless it was
    ignored when the process started (`nohup`)."""
    import signal

    hup = [] if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else [signal.SIGHUP]
    return [signal.SIGTERM, signal.SIGINT, *hup]


async def serve_until_drained(server: grpc.aio.Server, service: CoexitService, grace_s: float) -> None:
    """Serve until SIGTERM (or SIGINT), then drain: health turns NOT_SERVING, new Opens and new Appends get
    UNAVAILABLE (the edge resumes or replays elsewhere), Appends already being computed finish, and streams still
    open when `grace_s` runs out end with UNAVAILABLE."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in stop_signals():
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining: %d open streams, grace %.1f s", service.active_streams, grace_s)
    service.draining = True
    for name in (SERVICE_NAME, ""):
        await service.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    deadline = loop.time() + grace_s
    while service.active_streams and loop.time() < deadline:  # in-flight Appends finish; clients move away
        await asyncio.sleep(0.05)
    await server.stop(grace=min(1.0, max(0.0, deadline - loop.time())))
    sweeper = getattr(server, "_coexit_sweeper", None)
    if sweeper is not None:
        sweeper.cancel()
    service.stop()


def read_tls(tls_files: tuple[str, str] | None) -> tuple[bytes, bytes] | None:
    return (Path(tls_files[0]).read_bytes(), Path(tls_files[1]).read_bytes()) if tls_files else None


def banner(model_dir, host, port, info, layers: tuple[int, int], how: str) -> None:
    say(f"coexit cloud serving {model_dir} on {host}:{port} (layers [{layers[0]}, {layers[1]}), split "
        f"{info.split_layer}, {info.dtype}, fingerprint {info.fingerprint[:16]}…; {how})")


async def serve_forever(model_dir: str, port: int, host: str, limits: Limits, auth: Auth | None,
                        deep_only: bool, tls_files: tuple[str, str] | None, metrics_port: int = 0,
                        drain_grace_s: float = 10.0, health_http_port: int = 0, backend=None,
                        how: str = "one process", dtype: str = "auto") -> None:
    """One process: gRPC, sessions and the engine thread together (on `backend`, a LocalBackend, when given: a
    tensor-parallel rank 0's)."""
    from cloud.backend import LocalBackend
    from cloud.health_http import serve_health_http

    limits = with_identities(limits, auth)
    if backend is None:
        backend = LocalBackend(load_model(model_dir, deep_only=deep_only, dtype=dtype), limits)
    server, bound, service = await serve_backend(backend, port, host, limits, auth, read_tls(tls_files))
    if health_http_port:
        await serve_health_http(host, health_http_port, lambda: not service.draining)
    if metrics_port:
        mport = backend.engine.metrics.serve(metrics_port, host)
        say(f"coexit cloud metrics on http://{host}:{mport}/metrics")
    model = backend.engine.model
    banner(model_dir, host, bound, service.model_info, (model.start, model.stop), how)
    freeze_startup_heap()
    await serve_until_drained(server, service, drain_grace_s)
