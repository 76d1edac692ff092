"""The ways `coexit serve` spreads over processes, each started and stopped here:
- `--tp N`: one process per tensor-parallel rank, started by torchrun; rank 0 serves and leads the ticks, the
  others replay them (cloud/replica.py);
- `--frontends M`: M gRPC front-end processes sharing the port (SO_REUSEPORT) in front of one engine process, which
  holds the sessions and the engine (cloud/ipc.py carries the calls and the packed replies);
- both: the M front ends in front of tensor-parallel rank 0, which is then the engine process.
One process (cloud/server.py) stays the default for small installs and CI."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import tempfile
import threading
import time

from cloud.auth import Auth
from cloud.engine.heap import freeze_startup_heap
from cloud.server import (
    banner,
    load_model,
    read_tls,
    say,
    serve_dtype,
    serve_forever,
    serve_until_drained,
    start_grpc,
    stop_signals,
    with_identities,
)
from cloud.service import CoexitService
from cloud.sessions import Limits


# ---- tensor parallelism: one process per rank, started by torchrun ------------------------------------------------
def serve_tensor_parallel(model_dir: str, port: int, host: str, limits: Limits, auth: Auth | None, deep_only: bool,
                          tls_files: tuple[str, str] | None, metrics_port: int, drain_grace_s: float,
                          health_http_port: int, tp_size: int, tp_timeout_s: float = 600.0,
                          dtype: str = "auto", frontends: int = 0) -> int:
    """One rank of `torchrun --nproc_per_node N -m coexit serve --tp N`. Every rank loads its shard of the deep
    layers (cloud/tp.py) and its KV heads' pool and prints its memory; rank 0 serves gRPC (or, with `frontends`,
    is the engine process behind that many front ends) and leads the ticks, the others replay them
    (cloud/replica.py). Returns 1 when a rank is lost."""
    import torch

    from cloud.backend import LocalBackend
    from cloud.launch import die_with_parent
    from cloud.replica import Leader, follow
    from cloud.tp import describe, init_tp, kv_heads, load_sharded

    # torchrun's agent is the parent: if it is killed outright, rank 0 drains and the others go
    die_with_parent(signal.SIGTERM if os.environ.get("RANK", "0") == "0" else signal.SIGKILL)
    on_gpu = torch.cuda.is_available()
    tp = init_tp(tp_size, "cuda" if on_gpu else "cpu", tp_timeout_s)
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if on_gpu else torch.device("cpu")
    model = load_sharded(model_dir, tp, deep_only, serve_dtype(dtype, on_gpu), device, local=True)
    # the ranks run each tick in step (no lane); CUDA graphs of the collectives are not captured: not yet tested on GPUs
    limits = dataclasses.replace(with_identities(limits, auth), overlap="off",
                                 static_decode="eager" if limits.static_decode == "auto" else limits.static_decode)
    backend = LocalBackend(model, limits, kv_heads=kv_heads(model.config, tp), engine_thread=tp.rank == 0)
    pool = backend.engine.pool
    say(describe(model, tp, pool.num_blocks * pool.bytes_per_block))
    if tp.rank != 0:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # rank 0 drains, then tells the followers to stop
            signal.signal(sig, signal.SIG_IGN)
        freeze_startup_heap()
        try:
            follow(backend.manager, tp.cpu_group, device)
        except Exception as exc:
            say(f"coexit: tensor-parallel rank {tp.rank}: rank 0 is gone ({type(exc).__name__}); stopping")
            return 1
        return 0
    lost: list[BaseException] = []

    def on_lost(exc: BaseException) -> None:  # (engine thread) drain: health NOT_SERVING, then exit 1
        lost.append(exc)
        os.kill(os.getpid(), signal.SIGTERM)

    how = f"tensor parallel over {tp.world} ranks"
    Leader(backend.manager, tp.cpu_group, on_lost, tp.timeout_s)
    if frontends:
        code = _lead_frontends(backend, model_dir, port, host, limits, auth, tls_files, metrics_port, frontends,
                               drain_grace_s, health_http_port, how)
    else:
        async def run() -> None:
            await serve_forever(model_dir, port, host, limits, auth, deep_only, tls_files, metrics_port,
                                drain_grace_s, health_http_port, backend, how)

        code = 0
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run())
    if lost:
        say(f"coexit: a tensor-parallel rank was lost ({lost[0]}); the server stopped")
        return 1
    return code


def _lead_frontends(backend, model_dir, port, host, limits, auth, tls_files, metrics_port, frontends,
                    drain_grace_s, health_http_port, how) -> int:
    """Tensor-parallel rank 0 as the engine process behind `frontends` front-end processes: the engine's side of
    cloud.ipc runs on a thread of this process, beside the engine thread that leads the other ranks; stopping
    drains the front ends, then stops the engine, which tells the other ranks to stop."""
    from cloud.ipc import serve_engine

    _stop_on_signals()
    tmp = tempfile.TemporaryDirectory(prefix="coexit-engine-")
    address = f"ipc://{tmp.name}/engine.sock"
    loop = asyncio.new_event_loop()

    def run_engine() -> None:
        asyncio.set_event_loop(loop)
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(serve_engine(backend, address))

    engine = threading.Thread(target=run_engine, name="coexit-engine", daemon=True)
    try:
        engine.start()
        if metrics_port:
            mport = backend.engine.metrics.serve(metrics_port, host)
            say(f"coexit cloud metrics on http://{host}:{mport}/metrics")
        freeze_startup_heap()
        model = backend.engine.model
        return _supervise(mp.get_context("spawn"), frontends, address, port, host, limits, auth,
                          read_tls(tls_files), drain_grace_s, health_http_port, engine,
                          lambda bound: banner(model_dir, host, bound, backend.info, (model.start, model.stop),
                                                f"{how}; {frontends} front-end process(es)"))
    finally:
        if engine.is_alive():  # (the loop's tasks are listed and cancelled on its own thread)
            loop.call_soon_threadsafe(lambda: [task.cancel() for task in asyncio.all_tasks(loop)])
        engine.join(timeout=10)
        backend.stop()  # the engine thread: the other ranks are told to stop
        tmp.cleanup()


# ---- several front-end processes and one engine process ---------------------------------------------------------
def _engine_main(model_dir, deep_only, limits, address, metrics_port, host, ready, dtype="auto") -> None:
    from cloud.backend import LocalBackend
    from cloud.ipc import serve_engine
    from cloud.launch import die_with_parent

    die_with_parent(signal.SIGKILL, mp.parent_process().pid)
    for sig in (signal.SIGINT, signal.SIGHUP):  # they reach the whole group: the supervisor stops the engine
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s[engine] %(levelname)s %(message)s")
    backend = LocalBackend(load_model(model_dir, deep_only=deep_only, dtype=dtype), limits)
    model = backend.engine.model
    say(f"coexit engine process: layers [{model.start}, {model.stop}) in {backend.info.dtype}")
    if metrics_port:
        mport = backend.engine.metrics.serve(metrics_port, host)
        say(f"coexit cloud metrics on http://{host}:{mport}/metrics")
    freeze_startup_heap()
    ready.put((backend.info, (model.start, model.stop)))
    asyncio.run(serve_engine(backend, address))


def _frontend_main(address, port, host, limits, auth, tls, drain_grace_s, health_http_port=0) -> None:
    import torch

    from cloud.ipc import RemoteBackend
    from cloud.launch import die_with_parent

    die_with_parent(signal.SIGKILL, mp.parent_process().pid)
    torch.set_num_threads(1)  # a front end only decodes and checks rows
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s[front] %(levelname)s %(message)s")

    async def run():
        backend = RemoteBackend(address)
        info = await backend.connect()
        server, _, service = await start_grpc(CoexitService(backend, info, limits), port, host, limits, auth, tls,
                                              reuse_port=True)
        if health_http_port:  # every front end answers on the shared port, from its own draining state
            from cloud.health_http import serve_health_http

            await serve_health_http(host, health_http_port, lambda: not service.draining, reuse_port=True)
        freeze_startup_heap()
        await serve_until_drained(server, service, drain_grace_s)

    asyncio.run(run())


def serve_processes(model_dir: str, port: int, host: str, limits: Limits, auth: Auth | None, deep_only: bool,
                    tls_files: tuple[str, str] | None, metrics_port: int, frontends: int,
                    drain_grace_s: float = 10.0, health_http_port: int = 0, dtype: str = "auto") -> int:
    """`frontends` gRPC processes sharing `port` (SO_REUSEPORT) in front of one engine process; returns when a
    child dies (exit code 1) or on SIGTERM / Ctrl-C (0)."""
    import queue

    limits = with_identities(limits, auth)
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()  # the engine process's ModelInfo and layers, once it serves
    tmp = tempfile.TemporaryDirectory(prefix="coexit-engine-")
    address = f"ipc://{tmp.name}/engine.sock"
    engine = ctx.Process(target=_engine_main, name="coexit-engine",
                         args=(model_dir, deep_only, limits, address, metrics_port, host, ready, dtype))
    _stop_on_signals()
    try:
        engine.start()
        while True:
            try:
                info, layers = ready.get(timeout=0.2)
                break
            except queue.Empty:
                if not engine.is_alive():
                    say("coexit: the engine process failed to start")
                    return 1
        return _supervise(ctx, frontends, address, port, host, limits, auth, read_tls(tls_files), drain_grace_s,
                          health_http_port, engine, lambda bound: banner(
                              model_dir, host, bound, info, layers,
                              f"{frontends} front-end process(es), one engine process"))
    except KeyboardInterrupt:  # stopped while the engine was starting
        return 0
    finally:
        _reap([engine])
        tmp.cleanup()


# ---- the front ends, whichever engine they stand in front of -------------------------------------------------------
def _stop_on_signals() -> None:
    """Each stop signal raises KeyboardInterrupt in the main thread: the front ends drain and the engine stops, as
    on Ctrl-C."""
    for sig in stop_signals():
        signal.signal(sig, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))


def _supervise(ctx, frontends: int, address: str, port: int, host: str, limits: Limits, auth: Auth | None,
               tls: tuple[bytes, bytes] | None, drain_grace_s: float, health_http_port: int, engine,
               banner) -> int:
    """Start `frontends` front-end processes on `port` in front of the engine at `address`, call `banner(port)`
    once they serve, and watch them and `engine` (a process or a thread): returns 1 when one of them ends, 0 on
    SIGTERM / Ctrl-C (`_stop_on_signals`) once the front ends have drained."""
    from cloud.launch import free_port, wait_healthy

    port = port or free_port()
    fronts = []
    try:
        for i in range(frontends):
            front = ctx.Process(target=_frontend_main, name=f"coexit-front-{i}",
                                args=(address, port, host, limits, auth, tls, drain_grace_s, health_http_port))
            front.start()
            fronts.append(front)
        if tls is None:
            wait_healthy(f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}", timeout_s=600)
        banner(port)
        while engine.is_alive() and all(c.is_alive() for c in fronts):
            time.sleep(0.5)
        dead = [c.name for c in (engine, *fronts) if not c.is_alive()]
        say(f"coexit: {', '.join(dead)} exited; stopping")
        return 1
    except KeyboardInterrupt:  # SIGTERM / Ctrl-C: the front ends drain first, then the engine stops
        for c in fronts:
            if c.is_alive():
                os.kill(c.pid, signal.SIGTERM)
        for c in fronts:
            c.join(timeout=drain_grace_s + 5)
        return 0
    finally:
        _reap(fronts)


def _reap(children: list) -> None:
    for c in children:
        if c.is_alive():
            c.terminate()
    for c in children:
        c.join(timeout=5)
        if c.is_alive():
            c.kill()
