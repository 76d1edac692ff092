"""`coexit demo`: the main job. Starts the cloud service (unless --cloud points at one), puts an emulated wide-area
link between the edge and the cloud (50 ms RTT, 20 Mbit/s, a userspace relay; `--link none` for loopback), runs
edge clients on the bundled default model, completes a few code prompts showing each token's origin (in colour on
a terminal), and prints collaborative (the calibrated fixed thresholds), adaptive (the network-aware policy) and
cloud-only serving of the same prompts side by side: latency per token, bytes up and down, edge share and cloud
compute, with each mode's latency against cloud-only over the same link."""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

import coexit
from coexit.errors import UsageError
from coexit.exits import ExitPolicy
from edge.apps.generate import render
from edge.client import EdgeClient, Generation

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "coexit-code-small"
# Each ends where the tokenizer would put a token boundary in real code: after a line's code, or at the start of a
# line at column 0. A prompt that ends in indentation ("...:\n    ") makes the first token add one more space (the
# tokenizer merges a newline's spaces and keeps one for the next word), so its completion is not valid Python.
PROMPTS = [
    "import os\nimport sys\n",
    "def main():\n    parser = argparse.ArgumentParser()",
    "class Point:\n    def __init__(self, x, y):",
    "def read_file(path):\n    with open(path) as f:\n        return",
]


def parse_link(text: str) -> tuple[float, float] | None:
    """"50ms,20mbit" -> (RTT ms, Mbit/s); "none" -> None."""
    if text == "none":
        return None
    m = re.fullmatch(r"\s*([\d.]+)\s*ms\s*,\s*([\d.]+)\s*mbit\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"--link takes RTT,rate like 50ms,20mbit, or none; got {text!r}")
    return float(m.group(1)), float(m.group(2))


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


def run_mode(client: EdgeClient, max_new: int, mode: str | None = None, show: bool = False,
             colour: bool = False, progress: str | None = None) -> list[Generation]:
    gens = []
    tty = sys.stderr.isatty()
    for i, prompt in enumerate(PROMPTS):
        if progress and (tty or i == 0):
            print(f"\r{progress}: prompt {i + 1}/{len(PROMPTS)} ..." if tty else f"{progress}: {len(PROMPTS)} prompts",
                  end="" if tty else "\n", file=sys.stderr, flush=True)
        gen = client.generate(prompt, max_new, mode=mode)
        gens.append(gen)
        if show:
            print(("\033[2m" if colour else "") + prompt + ("\033[0m" if colour else "") + render(gen, colour))
            print("-" * 60)
    if progress and tty:
        print(f"\r{progress}: done{' ' * 20}", file=sys.stderr, flush=True)
    return gens


def check_cloud(address: str) -> None:
    """A --cloud given by the user: refuse at once, in one line, when no coexit cloud answers there."""
    from cloud.launch import wait_healthy

    try:
        wait_healthy(address, timeout_s=10)
    except TimeoutError:
        raise UsageError(f"no coexit cloud answers at {address} (its gRPC health check, for 10 s): start `coexit "
                         f"serve` there, or drop --cloud and the demo starts one on loopback") from None


def main(argv: list[str]) -> int:
    from coexit.cli import HelpFormatter

    ap = argparse.ArgumentParser(prog="coexit demo", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint directory")
    ap.add_argument("--cloud", help="HOST:PORT of a running `coexit serve` (default: start one on loopback)")
    ap.add_argument("--link", type=parse_link, default=parse_link("50ms,20mbit"),
                    help="emulated link between edge and cloud, RTT,rate (default 50ms,20mbit), or none")
    ap.add_argument("--max-new-tokens", type=int, default=40, help="tokens per prompt")
    ap.add_argument("--encoding", default="fp16", choices=["fp32", "fp16", "bf16", "int8"],
                    help="how hidden rows travel to the cloud")
    ap.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                    help="colour tokens by origin (auto: on a terminal)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the cloud-only comparison run")
    args = ap.parse_args(argv)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"no model at {model_dir} (no config.json there): pass --model DIR")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    proc = proxy = None
    address = args.cloud
    clients = []
    try:
        if address is None:
            from cloud.launch import start_cloud

            print(f"starting the cloud service on loopback for {model_dir} ...", flush=True)
            proc, address = start_cloud(model_dir)
        else:
            check_cloud(address)
        link = "loopback"
        if args.link is not None:
            from edge.apps.wan_emulator import DelayProxy

            host, port = address.rsplit(":", 1)
            proxy = DelayProxy(host, int(port), *args.link)
            address = proxy.start()
            link = f"an emulated {args.link[0]:g} ms RTT, {args.link[1]:g} Mbit/s link"
        colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
        config = coexit.read_config(model_dir)
        fixed = EdgeClient.from_checkpoint(model_dir, cloud=address, encoding=args.encoding, deadline_s=30.0)
        clients.append(fixed)
        if not fixed.policy.thresholds:
            fixed.policy = ExitPolicy.uniform(fixed.backend.exit_layers, 0.9)
        try:
            adaptive = EdgeClient.from_checkpoint(model_dir, cloud=address, encoding=args.encoding, deadline_s=30.0,
                                                  policy="adaptive")
            clients.append(adaptive)
        except (FileNotFoundError, ValueError) as exc:  # a model calibrated before the adaptive policy existed
            print(f"(no adaptive policy: {exc})")
            adaptive = None
        print(f"edge: layers [0, {config.split_layer}) with exits {fixed.backend.exit_layers}; cloud: "
              f"{args.cloud or 'loopback'} over {link}")
        print(f"collaborative run: {fixed.policy.describe()}")
        if adaptive is not None:
            print(f"adaptive run: {adaptive.policy.describe()}")
        legend = ("green = edge exit, blue = cloud, yellow = edge while the cloud was unreachable" if colour else
                  "[E<layer>] = edge exit at that layer, [C] = cloud, [S] = edge while the cloud was unreachable")
        shown = "adaptive" if adaptive is not None else "collaborative"
        print(f"\nthe {shown} run's completions ({legend}):\n")
        runs = {"collaborative": run_mode(fixed, args.max_new_tokens, show=adaptive is None, colour=colour,
                                          progress=None if adaptive is None else "collaborative run")}
        if adaptive is not None:
            run_mode(adaptive, 4)  # a few fallbacks to measure the link before the runs that count
            runs["adaptive"] = run_mode(adaptive, args.max_new_tokens, show=True, colour=colour)
            print(f"adaptive policy after the run: {adaptive.policy.describe()}")
        if not args.no_baseline:
            runs["cloud-only"] = run_mode(fixed, args.max_new_tokens, mode="cloud-only",
                                          progress="cloud-only run, for comparison")
        rows = {name: totals(gens, config.num_hidden_layers) for name, gens in runs.items()}
        print(f"\n{'mode':<14} {'ms/token':>9} {'up B/tok':>9} {'down B/tok':>10} {'edge share':>10} "
              f"{'cloud compute':>14}")
        for name, r in rows.items():
            compute = r["cloud_layer_tokens"] / max(1, r["cloud_only_layer_tokens"])
            print(f"{name:<14} {r['mean_ms']:>9.1f} {r['up']:>9.0f} {r['down']:>10.0f} {r['edge_share']:>10.0%} "
                  f"{compute:>14.0%}")
        if "cloud-only" in rows:
            base = rows["cloud-only"]["mean_ms"]
            ratios = ", ".join(f"{name} {r['mean_ms'] / max(1e-9, base):.2f}x" for name, r in rows.items()
                               if name != "cloud-only")
            print(f"latency per token against cloud-only over {link}: {ratios}")
    finally:
        for c in clients:
            c.close()
        if proxy is not None:
            proxy.stop()
        if proc is not None:
            proc.kill()
            proc.wait()
    return 0
