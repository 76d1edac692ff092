"""`coexit serve --model DIR [--port P]`: run the cloud service in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from cloud.auth import Auth
from cloud.server import serve_forever
from cloud.sessions import Limits


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="coexit serve", description="Serve an early-exit model's deep layers over gRPC.")
    ap.add_argument("--model", required=True, help="checkpoint directory (config.json, model.safetensors)")
    ap.add_argument("--port", type=int, default=50151)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a container)")
    ap.add_argument("--max-sessions", type=int, default=64)
    ap.add_argument("--kv-budget-mib", type=float, default=2048)
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
    ap.add_argument("--frontends", type=int, default=0,
                    help="gRPC front-end processes in front of one engine process (0: one process does all)")
    ap.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0: off)")
    ap.add_argument("--deep-only", action="store_true", help="load only layers [split, L) (no cloud-only mode)")
    ap.add_argument("--token", default=os.environ.get("COEXIT_TOKEN"), help="require this bearer token")
    ap.add_argument("--auth-file", help="TOML of identities: token hashes and per-identity limits (see README)")
    ap.add_argument("--tls-key", help="PEM private key (with --tls-cert) to serve TLS")
    ap.add_argument("--tls-cert")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    limits = Limits(max_sessions=args.max_sessions, kv_budget_bytes=int(args.kv_budget_mib * 2**20),
                    max_length=args.max_length, max_rows_per_append=args.max_rows, idle_ttl_s=args.idle_ttl,
                    block_size=args.block_size, rows_per_tick=args.rows_per_tick,
                    batch_wait=args.batch_wait, static_decode=args.static_decode)
    tls = (args.tls_key, args.tls_cert) if args.tls_key and args.tls_cert else None
    try:
        auth = Auth.from_file(args.auth_file) if args.auth_file else Auth.from_token(args.token) if args.token else None
    except ValueError as exc:
        print(f"coexit serve: {exc}", file=sys.stderr)
        return 2
    if args.frontends > 0:
        from cloud.server import serve_processes

        return serve_processes(args.model, args.port, args.host, limits, auth, args.deep_only, tls,
                               args.metrics_port, args.frontends, args.drain_grace)
    try:
        asyncio.run(serve_forever(args.model, args.port, args.host, limits, auth, args.deep_only, tls,
                                 args.metrics_port, args.drain_grace))
    except KeyboardInterrupt:
        pass
    return 0
