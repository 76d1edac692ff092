"""Benchmark: the same session load direct to a replica and through the shipped HAProxy (1 and 2 replicas behind
it), as bench/cloud_load.py drives it: decode tokens/s and client step p50/p99 per session count, with the
balancer's added client p50 against direct in the same run.

    python bench/balancer_load.py [--sessions 32,128] [--clients 2] [--steps 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cloud_load import run_load, write_shape  # noqa: E402
from cloud.balancer import Balancer, installed  # noqa: E402
from cloud.launch import free_port, start_cloud  # noqa: E402
from edge.link import CloudLink  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="default")
    ap.add_argument("--sessions", default="32,128")
    ap.add_argument("--clients", type=int, default=2, help="load-generator processes")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    if not installed("haproxy"):
        raise SystemExit("haproxy is not installed (`make setup` installs it from Debian's packages as root)")
    counts = [int(s) for s in args.sessions.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_shape(args.shape, Path(tmp) / args.shape)
        extra = ["--max-sessions", str(max(counts) + 8), "--kv-budget-mib", "1024"]
        replicas = []
        for _ in range(2):
            health = free_port()
            proc, address = start_cloud(model_dir, extra_args=[*extra, "--health-http-port", str(health)])
            replicas.append((proc, address, health))
        balancers = {}
        try:
            for n in (1, 2):
                backends = [(int(a.rsplit(":", 1)[1]), h) for _, a, h in replicas[:n]]
                (Path(tmp) / f"lb{n}").mkdir()
                balancers[n] = Balancer("haproxy", backends, Path(tmp) / f"lb{n}")
            link = CloudLink(replicas[0][1])
            info = link.info()
            link.close()
            print(f"shape {args.shape}: {info.num_layers} layers, d {info.hidden_size}; prompt {args.prompt}, "
                  f"{args.steps} decode steps per session, {args.clients} client processes; each replica one "
                  f"process, 1 compute thread; HAProxy 2.6 with deploy/haproxy/haproxy.cfg")
            print("| sessions | path | tokens/s | client p50 | client p99 | p50 vs direct |")
            print("|---|---|---|---|---|---|")
            for s in counts:
                rows = {}
                for name, address in (("direct, 1 replica", replicas[0][1]),
                                      ("HAProxy, 1 replica", balancers[1].address),
                                      ("HAProxy, 2 replicas", balancers[2].address)):
                    r = run_load(address, info.fingerprint, info.hidden_size, s, args.clients, args.prompt,
                                 args.steps, 0)
                    rows[name] = r
                    base = rows["direct, 1 replica"]["p50"]
                    print(f"| {s} | {name} | {r['tok_s']:.0f} | {r['p50'] * 1e3:.2f} ms | {r['p99'] * 1e3:.2f} ms | "
                          f"{(r['p50'] - base) * 1e3:+.2f} ms |", flush=True)
        finally:
            for b in balancers.values():
                b.close()
            for proc, _, _ in replicas:
                proc.terminate()
                proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
