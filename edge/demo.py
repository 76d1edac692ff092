"""`coexit demo`: the main job. Starts the cloud service (unless --cloud points at one), runs an edge client on the
bundled default model over loopback, completes a few code prompts showing each token's origin (in colour on a
terminal), and prints a summary against cloud-only serving of the same prompts: edge share, bytes up and down,
cloud compute saved and latency."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import coexit
from coexit.exits import ExitPolicy
from edge.cli import render
from edge.client import EdgeClient, Generation

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "coexit-code-small"
PROMPTS = [
    "import os\nimport sys\n",
    "if __name__ == '__main__':\n    ",
    "def read_file(path):\n    with open(path) as f:\n        ",
    "    for i in range(len(items)):\n        ",
]


def totals(gens: list[Generation], num_layers: int) -> dict:
    n = sum(len(g.events) for g in gens)
    positions = sum(len(g.prompt_ids) + len(g.events) - 1 for g in gens)
    lat = [e.latency_s * 1e3 for g in gens for e in g.events[1:]]
    return {
        "tokens": n,
        "edge_share": sum(e.origin != "cloud" for g in gens for e in g.events) / max(1, n),
        "up": sum(g.counters.bytes_up for g in gens) / max(1, n),
        "down": sum(g.counters.bytes_down for g in gens) / max(1, n),
        "cloud_layer_tokens": sum(g.counters.cloud_layer_tokens for g in gens),
        "cloud_only_layer_tokens": num_layers * positions,
        "p50_ms": statistics.median(lat) if lat else 0.0,
        "mean_ms": statistics.fmean(lat) if lat else 0.0,
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="coexit demo", description=__doc__)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--cloud", help="HOST:PORT of a running `coexit serve` (default: start one on loopback)")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--encoding", default="fp16")
    ap.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    ap.add_argument("--no-baseline", action="store_true", help="skip the cloud-only comparison run")
    args = ap.parse_args(argv)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        print(f"coexit demo: no model at {model_dir}; pass --model DIR", file=sys.stderr)
        return 2
    proc = None
    address = args.cloud
    if address is None:
        from cloud.launch import start_cloud

        print(f"starting the cloud service on loopback for {model_dir} ...", flush=True)
        proc, address = start_cloud(model_dir)
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    try:
        client = EdgeClient.from_checkpoint(model_dir, cloud=address, encoding=args.encoding)
        config = coexit.read_config(model_dir)
        policy = client.policy
        if not policy.thresholds:
            policy = client.policy = ExitPolicy.uniform(client.backend.exit_layers, 0.9)
        print(f"edge: layers [0, {config.split_layer}) with exits {client.backend.exit_layers}, thresholds "
              f"{ {k: round(v, 3) for k, v in policy.thresholds.items()} }; cloud: {address}\n")
        gens = []
        for prompt in PROMPTS:
            gen = client.generate(prompt, args.max_new_tokens)
            gens.append(gen)
            print(("\033[2m" if colour else "") + prompt + ("\033[0m" if colour else "") + render(gen, colour))
            print("-" * 60)
        legend = ("green = edge exit, blue = cloud, yellow = edge while the cloud was unreachable" if colour else
                  "[E<layer>] = edge exit at that layer, [C] = cloud, [S] = edge while the cloud was unreachable")
        print(legend)
        ours = totals(gens, config.num_hidden_layers)
        line = (f"collaborative: {ours['tokens']} tokens, {ours['edge_share']:.0%} exited on the edge; "
                f"up {ours['up']:.0f} B/token, down {ours['down']:.0f} B/token; cloud compute "
                f"{ours['cloud_layer_tokens'] / ours['cloud_only_layer_tokens']:.0%} of cloud-only "
                f"({1 - ours['cloud_layer_tokens'] / ours['cloud_only_layer_tokens']:.0%} saved); "
                f"latency p50 {ours['p50_ms']:.1f} ms/token")
        print(line)
        if not args.no_baseline:
            base = totals([client.generate(p, args.max_new_tokens, mode="cloud-only") for p in PROMPTS],
                          config.num_hidden_layers)
            print(f"cloud-only:    {base['tokens']} tokens; up {base['up']:.0f} B/token, down {base['down']:.0f} "
                  f"B/token; latency p50 {base['p50_ms']:.1f} ms/token (collaborative/cloud-only latency "
                  f"{ours['mean_ms'] / max(1e-9, base['mean_ms']):.2f}x, mean)")
        client.close()
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
    return 0
