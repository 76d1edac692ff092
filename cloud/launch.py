"""Start `coexit serve` as a child process on a free loopback port and wait until grpc.health says SERVING.
Used by the demo, the benchmarks and the restart test (a real separate process, a real loopback link).

Children die with their parent: every process coexit starts asks the kernel (Linux PR_SET_PDEATHSIG) for a signal
when its parent dies, so a killed demo, a closed terminal or a crashed supervisor leaves no server behind."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Linux: receive `sig` when the parent dies (call it in the child: preexec_fn, or a process's target). The
    kernel only signals deaths after the request, so a child that knows its parent's pid (`parent`: a
    multiprocessing child's `parent_process().pid`) and finds it already gone (it was reparented while the child
    imported, say) gets `sig` at once instead of outliving it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def dies_with_parent(cmd: list[str], sig: str = "TERM") -> list[str]:
    """`cmd` run so that it gets SIG{sig} when the process that starts it dies: through util-linux's setpriv (a
    preexec_fn would do the same, but it runs Python's at-fork handlers, and grpc's can deadlock the fork while
    channels are busy in other threads)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", sig, *cmd] if setpriv else cmd


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Refuse, in one line, a port another process holds (before loading a model, and before gRPC's C core logs
    its own bind failure)."""
    from coexit.errors import UsageError

    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UsageError(f"{flag} {port}: cannot listen on {host}:{port} ({exc.strerror}); pick another port or "
                             f"stop the process that holds it") from None


def wait_until(cond, timeout_s: float = 20.0, every_s: float = 0.1) -> bool:
    """Poll cond() until it is true (True) or timeout_s passes (False)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(every_s)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(address: str, timeout_s: float = 60.0, proc: subprocess.Popen | None = None,
                 root_cert: bytes | None = None) -> None:
    # reconnect every 0.1-0.2 s while the server starts, not on gRPC's default backoff (1 s, growing 1.6x a try)
    opts = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 200)]
    channel = (grpc.secure_channel(address, grpc.ssl_channel_credentials(root_cert), options=opts) if root_cert
               else grpc.insecure_channel(address, options=opts))
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the cloud process exited with {proc.returncode}: {server_log(proc)[-2000:]}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
        raise TimeoutError(f"the cloud at {address} did not report SERVING within {timeout_s:.0f} s")
    finally:
        channel.close()


def torchrun(n: int) -> list[str]:
    """The command prefix that starts `n` ranks of the command after it (`coexit serve --tp n`), on this host."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "--no-python"]


def server_log(proc: subprocess.Popen) -> str:
    """What a process started by `start_cloud` (or with a piped stderr) has written to stderr so far."""
    log_file = getattr(proc, "coexit_log", None)
    if log_file is not None:  # pread: the file offset is the server's own (it shares the open file)
        fd = log_file.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")
    if proc.stderr is None:
        return ""
    text = proc.stderr.read()  # (bytes, or str from a pipe opened in text mode)
    return text if isinstance(text, str) else text.decode(errors="replace")


def start_cloud(model_dir, port: int | None = None, extra_args: list[str] | None = None, threads: int = 1,
                prefix: list[str] | None = None, health_host: str = "127.0.0.1",
                cwd: str | None = None, root_cert: bytes | None = None,
                stdout=subprocess.DEVNULL) -> tuple[subprocess.Popen, str]:
    """Returns (process, "HOST:PORT") once the server is healthy. prefix wraps the command (e.g. `ip netns exec`);
    cwd runs it from another checkout (`python -m` imports from the working directory first); stdout: where its
    start-up lines go (a file). Its log (stderr) goes to an unnamed temporary file that `server_log` reads: a pipe
    nobody drains would stop the server at its first write past the pipe's 64 KiB."""
    port = port or free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [*(prefix or []), sys.executable, "-m", "coexit.cli", "serve", "--model", str(model_dir),
           "--port", str(port), *(extra_args or [])]
    log_file = tempfile.TemporaryFile()
    proc = subprocess.Popen(dies_with_parent(cmd), env=env, stdout=stdout, stderr=log_file,
                            cwd=cwd)  # SIGTERM: the orphan drains and exits
    proc.coexit_port, proc.coexit_log = port, log_file
    address = f"{health_host}:{port}"
    try:
        wait_healthy(address, proc=proc, root_cert=root_cert)
    except BaseException:
        proc.kill()
        raise
    return proc, address
