"""Benchmark of the edge backends on one random checkpoint: torch fp32, bitsandbytes int8/nf4, llama.cpp GGUF
f16/q8_0/q4_0/q4_k_m.

Per backend, in a fresh subprocess (so resident memory is the stage's own): edge decode tokens/s (one token per
step after a prompt, all edge exits evaluated, decide=None, `--threads` threads), resident memory added by
building the stage and running it (VmRSS delta; glibc told to return freed memory: MALLOC_MMAP_THRESHOLD_=65536
MALLOC_TRIM_THRESHOLD_=0), top-1 agreement of the split exit with torch fp32, teacher-forced over held-out text
tokenized by the checkpoint's tokenizer, and for llama.cpp the capture overhead: tokens/s of the same GGUF
decoded with the hidden-state capture (eval callback) over tokens/s of plain llama.cpp decoding (no callback).

    python bench/edge_backends.py [--layers 8 --split 4 --hidden 512 ...] [--backends torch,gguf-q4_0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELD_OUT = ("Edge devices answer easy tokens themselves and hand the hard ones to the cloud. The server keeps "
            "each session's cache, so the device never resends its context; it uploads hidden states only. "
            "def mean(xs):\n    return sum(xs) / len(xs)\n\nfor name in sorted(names):\n    print(name.upper())\n")
BACKENDS = ["torch", "bnb-int8", "bnb-nf4", "gguf-f16", "gguf-q8_0", "gguf-q4_0", "gguf-q4_k_m"]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_checkpoint(args, path: Path) -> Path:
    from coexit.checkpoint import save
    from coexit.config import Config, EarlyExitConfig
    from coexit.tiny import SAMPLE_TEXT, random_model, train_bpe

    exits = tuple(sorted({max(1, args.split // 2), args.split, min(args.layers - 1, args.split + 2)}))
    cfg = Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                 num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                 max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                 early_exit=EarlyExitConfig(exits, args.split, True, ()))
    model = random_model(cfg, seed=0, std=args.hidden ** -0.5)
    return save(model, path, tokenizer=train_bpe(SAMPLE_TEXT * 4 + [HELD_OUT[:40]], args.vocab))


def worker(kind: str, ckpt: Path, gguf: Path | None, args) -> dict:
    """Runs in its own process: build one backend, measure it, return figures."""
    import torch

    torch.set_num_threads(args.threads)
    import bitsandbytes  # noqa: F401  (imported before the baseline so its import is not counted)
    import llama_cpp  # noqa: F401

    from coexit.tokenizer import Tokenizer
    from edge.backends.registry import make_backend

    tok = Tokenizer.from_file(ckpt / "tokenizer.json")
    if args.text:
        from coexit.textdata import read_documents

        text_ids = []
        for doc in read_documents([args.text]):
            text_ids += tok.encode(doc)
            if len(text_ids) >= args.text_tokens:
                break
        text_ids = text_ids[: args.text_tokens]
    else:
        text_ids = tok.encode(HELD_OUT)
    prompt = text_ids[: args.prompt]
    base = rss_mib()
    if kind.startswith("gguf"):
        backend = make_backend("gguf", gguf, n_threads=args.threads, max_len=1024)
    else:
        backend = make_backend(kind, ckpt, max_len=1024)
    split = backend.split
    # teacher-forced split-exit top-1 over the held-out text
    top1 = []
    for i, t in enumerate(text_ids):
        top1.append(int(backend.step([t], i, None).exit_logits[split].argmax()))
    tps = 0.0
    for _ in range(args.repeats):  # best of N: the machine is shared, the best run is the least disturbed
        backend.reset()
        backend.step(prompt, 0, None)
        pos, tok = len(prompt), prompt[-1]
        t0 = time.perf_counter()
        for _ in range(args.tokens):
            r = backend.step([tok], pos, None)
            tok, pos = int(r.exit_logits[split].argmax()), pos + 1
        tps = max(tps, args.tokens / (time.perf_counter() - t0))
        if time.perf_counter() - t0 > 5:  # slow backends: one run is long enough to average out noise
            break
    out = {"kind": kind, "tps": tps, "rss_mib": rss_mib() - base, "top1": top1}
    if kind.startswith("gguf"):
        out.update(capture_overhead(backend, prompt, args))
    return out


def capture_overhead(backend, prompt, args) -> dict:
    """Decode the same GGUF with the backend's capture set, and plain (no eval callback): tokens/s of each."""
    from edge.backends.llamacpp import LlamaSession

    capture = sorted(backend.session.wanted.values())
    backend.close()
    sessions = {"plain": LlamaSession(backend.path, 1024, args.threads),
                "capture": LlamaSession(backend.path, 1024, args.threads, capture=capture)}
    figures = {"plain_tps": 0.0, "capture_tps": 0.0}
    for _ in range(args.repeats):  # interleaved, best of N each, so load from other processes hits both alike
        for label, s in sessions.items():
            s.clear()
            s.decode(prompt, 0)
            pos = len(prompt)
            t0 = time.perf_counter()
            for _ in range(args.tokens):
                s.decode([5], pos)
                pos += 1
                for parts in s.captured.values():
                    parts.clear()
            figures[f"{label}_tps"] = max(figures[f"{label}_tps"], args.tokens / (time.perf_counter() - t0))
    for s in sessions.values():
        s.close()
    figures["capture_ratio"] = figures["capture_tps"] / figures["plain_tps"]
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--split", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens before the timed decode")
    ap.add_argument("--tokens", type=int, default=64, help="timed decode steps")
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats (the best is kept)")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--model", help="benchmark this checkpoint directory instead of a random one")
    ap.add_argument("--text", help="held-out text (file, directory or .jsonl) for the top-1 agreement")
    ap.add_argument("--text-tokens", type=int, default=512, help="tokens of --text to score")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.ckpt), Path(args.gguf) if args.gguf else None, args)))
        return 0

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.model) if args.model else make_checkpoint(args, Path(tmp) / "ckpt")
        if args.model:
            from coexit.checkpoint import read_config

            c = read_config(ckpt)
            args.layers, args.split, args.hidden, args.intermediate = (c.num_hidden_layers, c.split_layer,
                                                                       c.hidden_size, c.intermediate_size)
            args.heads, args.kv_heads, args.vocab = c.num_attention_heads, c.num_key_value_heads, c.vocab_size
        print(f"model: {args.model or 'random'}: {args.layers} layers (edge [0, {args.split})), hidden {args.hidden}, "
              f"intermediate "
              f"{args.intermediate}, heads {args.heads}/{args.kv_heads}, vocab {args.vocab}; {args.threads} threads, "
              f"{args.tokens} decode steps after a {args.prompt}-token prompt")
        rows = {}
        for kind in args.backends.split(","):
            gguf = None
            if kind.startswith("gguf"):
                from edge.export_gguf import export_gguf

                gguf = export_gguf(ckpt, kind.split("-", 1)[1], Path(tmp) / f"edge-{kind}.gguf")
            shared = [x for k in ("threads", "prompt", "tokens", "repeats", "text_tokens")
                      for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
            if args.text:
                shared += ["--text", str(Path(args.text).resolve())]
            cmd = [sys.executable, __file__, "--worker", kind, "--ckpt", str(ckpt), *shared]
            if gguf:
                cmd += ["--gguf", str(gguf)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{kind}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
            if gguf:
                rows[kind]["file_mib"] = gguf.stat().st_size / 2**20
    ref = rows.get("torch", {}).get("top1")
    base_tps = rows.get("torch", {}).get("tps")
    print(f"\n{'backend':12s} {'tok/s':>8s} {'x fp32':>7s} {'RSS MiB':>8s} {'file MiB':>8s} {'top-1 vs fp32':>13s} "
          f"{'plain tok/s':>11s} {'capture/plain':>13s}")
    for kind, r in rows.items():
        agree = (sum(a == b for a, b in zip(r["top1"], ref)) / len(ref)) if ref else float("nan")
        speed = r["tps"] / base_tps if base_tps else float("nan")
        plain = f"{r['plain_tps']:11.1f}" if "plain_tps" in r else f"{'-':>11s}"
        ratio = f"{r['capture_ratio']:13.2f}" if "capture_ratio" in r else f"{'-':>13s}"
        file_mib = f"{r['file_mib']:8.1f}" if "file_mib" in r else f"{'-':>8s}"
        print(f"{kind:12s} {r['tps']:8.1f} {speed:7.2f} {r['rss_mib']:8.1f} {file_mib} {agree:13.1%} {plain} {ratio}")
    n = len(ref) if ref else 0
    print(f"\ntop-1: split exit (layer {args.split}) argmax, teacher-forced over {n} held-out tokens; capture/plain: "
          f"llama.cpp tokens/s with the eval-callback capture over plain decoding of the same GGUF (best of "
          f"{args.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
