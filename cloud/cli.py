"""`coexit serve --model DIR [--port P]`: serve an early-exit model's deep layers (and cloud-only decoding) over
gRPC, in the foreground; SIGTERM drains it. With `--tp N` it is one rank of a tensor-parallel server, started as
`torchrun --nproc_per_node N -m coexit serve --tp N ...`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

import coexit
from cloud.auth import Auth
from cloud.launch import check_port_free
from cloud.server import SERVE_DTYPES, serve_forever
from cloud.sessions import Limits
from coexit.errors import UsageError


def check_args(args) -> None:
    """Refuse half a configuration and out-of-range numbers before loading the model."""
    if bool(args.tls_key) != bool(args.tls_cert):
        given, missing = ("--tls-key", "--tls-cert") if args.tls_key else ("--tls-cert", "--tls-key")
        raise UsageError(f"{given} without {missing}: TLS needs both the private key and the certificate (the "
                         f"server will not fall back to plaintext)")
    for flag, path in (("--tls-key", args.tls_key), ("--tls-cert", args.tls_cert), ("--auth-file", args.auth_file)):
        if path and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")
    at_least = {"--max-sessions": (args.max_sessions, 1), "--max-rows": (args.max_rows, 1),
                "--block-size": (args.block_size, 1), "--rows-per-tick": (args.rows_per_tick, 1),
                "--max-length": (args.max_length, 0), "--idle-ttl": (args.idle_ttl, 0),
                "--batch-wait": (args.batch_wait, 0), "--drain-grace": (args.drain_grace, 0),
                "--frontends": (args.frontends, 0), "--tp": (args.tp, 1)}
    for flag, (value, low) in at_least.items():
        if value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    if not args.tp_timeout > 0:
        raise UsageError(f"--tp-timeout must be positive, got {args.tp_timeout}")
    if not args.kv_budget_mib > 0:
        raise UsageError(f"--kv-budget-mib must be positive, got {args.kv_budget_mib}")
    for flag, port in (("--port", args.port), ("--metrics-port", args.metrics_port),
                       ("--health-http-port", args.health_http_port)):
        if not 0 <= port <= 65535:
            raise UsageError(f"{flag} must be a TCP port in [0, 65535], got {port}")
    config = coexit.read_config(args.model)  # a wrong --model: one line naming the directory
    if args.tp > 1:
        check_tp(args, config)
        if int(os.environ.get("RANK", "0")) != 0:  # only rank 0 binds ports
            return
    check_port_free(args.host, args.port)
    if args.metrics_port:
        check_port_free(args.host, args.metrics_port, "--metrics-port")
    if args.health_http_port:
        check_port_free(args.host, args.health_http_port, "--health-http-port")


def check_tp(args, config) -> None:
    from cloud.tp import check_launch, check_shardable

    check_launch(args.tp)
    if args.overlap == "on":
        raise UsageError("--overlap on with --tp is not supported: the ranks run each tick in step")
    check_shardable(config, args.tp)


def main(argv: list[str]) -> int:
    from coexit.cli import HelpFormatter

    ap = argparse.ArgumentParser(prog="coexit serve", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (config.json, model.safetensors)")
    ap.add_argument("--port", type=int, default=50151, help="gRPC port")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a container)")
    ap.add_argument("--max-sessions", type=int, default=64, help="sessions held at once")
    ap.add_argument("--kv-budget-mib", type=float, default=2048, help="size of the deep-layer KV pool")
    ap.add_argument("--max-length", type=int, default=0, help="positions per session (0: the model's maximum)")
    ap.add_argument("--max-rows", type=int, default=4096, help="rows per Append")
    ap.add_argument("--idle-ttl", type=float, default=300.0, help="seconds a broken session stays resumable")
    ap.add_argument("--block-size", type=int, default=16, help="positions per KV block")
    ap.add_argument("--rows-per-tick", type=int, default=256,
                    help="the engine's row budget per tick (longer uploads are chunked)")
    ap.add_argument("--batch-wait", type=float, default=1.0,
                    help="the engine may wait up to this fraction of its last tick for the sessions it served in "
                         "the last two ticks, so they share one tick (0: start every tick at once)")
    ap.add_argument("--drain-grace", type=float, default=10.0,
                    help="on SIGTERM, seconds to let Appends in flight finish before open streams end")
    ap.add_argument("--static-decode", choices=["auto", "eager", "off"], default="auto",
                    help="decode-only ticks on static shapes: auto = CUDA graphs on a GPU, general path on a CPU")
    ap.add_argument("--overlap", choices=["auto", "on", "off"], default="auto",
                    help="run decode-only ticks on a device lane and prepare the next tick meanwhile: auto = on a GPU")
    ap.add_argument("--tp", type=int, default=1,
                    help="tensor-parallel ranks for the deep layers (launch with torchrun --nproc_per_node N)")
    ap.add_argument("--tp-timeout", type=float, default=600.0,
                    help="with --tp: seconds a rank waits for the others (start-up included) before the server stops "
                         "with an error; an idle server's ranks stay in touch meanwhile")
    ap.add_argument("--frontends", type=int, default=0,
                    help="gRPC front-end processes in front of one engine process (0: one process does all; with "
                         "--tp, tensor-parallel rank 0 is the engine process)")
    ap.add_argument("--health-http-port", type=int, default=0,
                    help="answer GET /healthz over HTTP/1 on this port: 200 while serving, 503 while draining (for "
                         "load balancers without gRPC health checks, e.g. HAProxy; 0: off)")
    ap.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0: off)")
    ap.add_argument("--dtype", choices=SERVE_DTYPES, default="auto",
                    help="what the cloud computes in (auto: the checkpoint's dtype on a GPU, float32 on a CPU; "
                         "bfloat16 is about 1.7x faster on CPUs with AMX, slower on others)")
    ap.add_argument("--deep-only", action="store_true", help="load only layers [split, L) (no cloud-only mode)")
    ap.add_argument("--token", default=os.environ.get("COEXIT_TOKEN"),
                    help="require this bearer token (default: $COEXIT_TOKEN, else none)")
    ap.add_argument("--auth-file",
                    help="TOML of identities: token hashes and per-identity limits (see README); replaces --token")
    ap.add_argument("--tls-key", help="PEM private key (with --tls-cert) to serve TLS")
    ap.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key) to serve TLS")
    args = ap.parse_args(argv)
    check_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    limits = Limits(max_sessions=args.max_sessions, kv_budget_bytes=int(args.kv_budget_mib * 2**20),
                    max_length=args.max_length, max_rows_per_append=args.max_rows, idle_ttl_s=args.idle_ttl,
                    block_size=args.block_size, rows_per_tick=args.rows_per_tick,
                    batch_wait=args.batch_wait, static_decode=args.static_decode, overlap=args.overlap)
    tls = (args.tls_key, args.tls_cert) if args.tls_key else None
    try:
        auth = Auth.from_file(args.auth_file) if args.auth_file else Auth.from_token(args.token) if args.token else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.tp > 1:
        from cloud.processes import serve_tensor_parallel

        return serve_tensor_parallel(args.model, args.port, args.host, limits, auth, args.deep_only, tls,
                                     args.metrics_port, args.drain_grace, args.health_http_port, args.tp,
                                     args.tp_timeout, dtype=args.dtype, frontends=args.frontends)
    if args.frontends > 0:
        from cloud.processes import serve_processes

        return serve_processes(args.model, args.port, args.host, limits, auth, args.deep_only, tls,
                               args.metrics_port, args.frontends, args.drain_grace, args.health_http_port,
                               dtype=args.dtype)
    try:
        asyncio.run(serve_forever(args.model, args.port, args.host, limits, auth, args.deep_only, tls,
                                 args.metrics_port, args.drain_grace, args.health_http_port, dtype=args.dtype))
    except KeyboardInterrupt:
        pass
    return 0
