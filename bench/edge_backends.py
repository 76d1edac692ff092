"""Benchmark of the edge backends on one checkpoint (random, or --model): torch fp32, bitsandbytes int8/nf4,
llama.cpp GGUF f16/q8_0/q4_0/q4_k_m as segments (default; `-whole` for one file).

Per backend, in a fresh subprocess (so resident memory is the stage's own): edge decode tokens/s (one token per
step after a prompt, all edge exits evaluated, decide=None, `--threads` threads), resident memory added by
building the stage and running it (VmRSS delta; glibc told to return freed memory: MALLOC_MMAP_THRESHOLD_=65536
MALLOC_TRIM_THRESHOLD_=0), top-1 agreement of the split exit with torch fp32, teacher-forced over held-out text
tokenized by the checkpoint's tokenizer, and the share of edge layer-tokens that exits kept off each token's own
step (`skipped`: the latency saving) and those never run by the end of the text (`saved`: KV catch-up runs the
others later, batched with the next token that goes deeper), under the checkpoint's exit_policy.json, or for a
random checkpoint a policy taking the first exit at its median confidence.

llama.cpp also gets, against plain llama.cpp decoding of one whole GGUF of the same weights and threads:
- capture/plain: a decode step through the layout's contexts with the C capture callback (every segment, so a
  segmented layout also pays each segment's exit head) over a plain decode step (no callback), both with the
  backend's flash-attention setting;
- e2e/llama: `EdgeClient(...).generate` in standalone mode (the checkpoint's policy, 128 tokens) over
  `llama_cpp.Llama.create_completion` (greedy, 128 tokens, the same flash-attention setting), same prompt.
The torch row gets torch/plain: the torch backend's decode step over a plain-PyTorch step of the same layers
(bench/torch_step.py).

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

import numpy as np

HELD_OUT = ("Edge devices answer easy tokens themselves and hand the hard ones to the cloud. The server keeps "
            "each session's cache, so the device never resends its context; it uploads hidden states only. "
            "def mean(xs):\n    return sum(xs) / len(xs)\n\nfor name in sorted(names):\n    print(name.upper())\n")
BACKENDS = ["torch", "bnb-int8", "bnb-nf4", "gguf-f16", "gguf-q8_0", "gguf-q4_0", "gguf-q4_k_m", "gguf-q4-mix",
            "gguf-q4-mix-whole"]


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


def _policy(ckpt: Path, exits: list[int], confidences: dict[int, list[float]]):
    """The checkpoint's calibrated policy, else the first exit at its median confidence (a random model has
    none; this exercises the mechanism with about half the tokens exiting)."""
    from coexit.exits import ExitPolicy
    from edge.policy.calibrate import load_policy

    if (ckpt / "exit_policy.json").exists():
        return load_policy(ckpt), "exit_policy.json"
    first = exits[0]
    conf = sorted(confidences[first])
    return ExitPolicy({first: conf[len(conf) // 2]}), f"exit {first} at its median max-prob {conf[len(conf) // 2]:.3f}"


def worker(kind: str, ckpt: Path, gguf: Path | None, args) -> dict:
    """Runs in its own process: build one backend, measure it, return figures."""
    import torch

    torch.set_num_threads(args.threads)
    import bitsandbytes  # noqa: F401  (imported before the baseline so its import is not counted)
    import llama_cpp  # noqa: F401

    from coexit.exits import confidence
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
    top1, conf = [], {e: [] for e in backend.exit_layers}
    for i, t in enumerate(text_ids):
        r = backend.step([t], i, None)
        top1.append(int(r.exit_logits[split].argmax()))
        for e, lg in r.exit_logits.items():
            conf[e].append(float(confidence(lg, "max_prob")))
    policy, policy_name = _policy(ckpt, backend.exit_layers, conf)
    # the same text under the policy. skipped: layer-rows each token did not run on its own step (its latency);
    # saved: layer-rows never run by the end of the text (KV catch-up of exited rows runs most of them later,
    # batched with the next deeper token)
    skips = getattr(backend, "layout", "") != "whole"
    backend.reset()
    own = 0
    for i, t in enumerate(text_ids):
        r = backend.step([t], i, policy.decide)
        own += r.depth if (r.exited and skips) else split
    skipped = 1 - own / (len(text_ids) * split)
    saved = 1 - backend.layer_tokens / (len(text_ids) * split)
    tps = 0.0
    for _ in range(args.repeats):  # best of N: the machine is shared, the best run is the least disturbed
        backend.reset()
        backend.step(prompt, 0, None)
        pos, tok_id = len(prompt), prompt[-1]
        t0 = time.perf_counter()
        for _ in range(args.tokens):
            r = backend.step([tok_id], pos, None)
            tok_id, pos = int(r.exit_logits[split].argmax()), pos + 1
        tps = max(tps, args.tokens / (time.perf_counter() - t0))
        if time.perf_counter() - t0 > 5:  # slow backends: one run is long enough to average out noise
            break
    out = {"kind": kind, "tps": tps, "rss_mib": rss_mib() - base, "top1": top1, "skipped": skipped, "saved": saved,
           "policy": policy_name}
    if kind.startswith("gguf"):
        out.update(capture_overhead(backend, prompt, args))
        out.update(end_to_end(backend, ckpt, tok, policy, args))
    if kind == "torch":
        from bench.torch_step import measure

        out["torch_vs_plain"] = measure(str(ckpt), args.threads, args.prompt, args.tokens, args.repeats)["ratio"]
    return out


def _plain_file(backend) -> Path:
    """One whole GGUF of the backend's weights: the backend's own file, or the one exported beside segments."""
    return backend.path if backend.path.is_file() else backend.path.with_suffix(".whole.gguf")


def capture_overhead(backend, prompt, args) -> dict:
    """Decode steps through the backend's contexts with the C capture (segments chained through embeddings),
    and plain steps of one whole GGUF of the same weights (no callback): tokens/s of each, interleaved."""
    from edge.backends.llamacpp import LlamaSession

    plain = LlamaSession(_plain_file(backend), 1024, args.threads, flash_attn=backend.flash_attn)
    stages = backend.stages

    def capture_step(pos: int, first: bool) -> None:
        x: list[int] | np.ndarray = prompt if first else [5]
        at = 0 if first else pos
        for st in stages:
            st.session.decode(x, at)
            x = st.session.take_captured(st.hi - st.lo - 1)
            for e in st.heads:
                st.session.take_captured(e - 1)

    figures = {"plain_tps": 0.0, "capture_tps": 0.0}
    for _ in range(args.repeats):  # interleaved, best of N each, so load from other processes hits both alike
        for label in ("plain", "capture"):
            if label == "plain":
                plain.clear()
                plain.decode(prompt, 0)
            else:
                backend.reset()
                capture_step(0, True)
            pos = len(prompt)
            t0 = time.perf_counter()
            for _ in range(args.tokens):
                if label == "plain":
                    plain.decode([5], pos)
                else:
                    capture_step(pos, False)
                pos += 1
            figures[f"{label}_tps"] = max(figures[f"{label}_tps"], args.tokens / (time.perf_counter() - t0))
    plain.close()
    figures["capture_ratio"] = figures["capture_tps"] / figures["plain_tps"]
    return figures


def end_to_end(backend, ckpt: Path, tok, policy, args) -> dict:
    """EdgeClient standalone generation against llama-cpp-python's create_completion on one whole GGUF of the
    same weights: tokens/s of each (greedy, --e2e-tokens tokens, the same prompt), best of N, interleaved."""
    from edge.client import EdgeClient
    from edge.llamacpp.lib import stock_llama

    backend.reset()
    client = EdgeClient(backend, tok, policy=policy, mode="standalone")
    # the same extra-buffer-types verdict as the backend's own sessions (edge/llamacpp/lib.py), so like for like
    llm = stock_llama(_plain_file(backend), n_ctx=1024, n_threads=args.threads, n_batch=256,
                      flash_attn=backend.flash_attn, verbose=False)
    ids = tok.encode("import os\n\n\ndef read_config(path):\n", add_bos=True)
    n = args.e2e_tokens
    best = {"edge_tps": 0.0, "llama_tps": 0.0}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        gen = client.generate(ids, n, stop_at_eos=False)
        best["edge_tps"] = max(best["edge_tps"], len(gen.events) / (time.perf_counter() - t0))
        llm.reset()
        t0 = time.perf_counter()
        out = llm.create_completion(ids, max_tokens=n, temperature=0.0,  # no early EOS: the edge side goes on too
                                    logit_bias={tok.eos_id: -1e9} if tok.eos_id is not None else None)
        best["llama_tps"] = max(best["llama_tps"], out["usage"]["completion_tokens"] / (time.perf_counter() - t0))
    llm.close()
    best["e2e_ratio"] = best["edge_tps"] / best["llama_tps"]
    best["e2e_edge_exits"] = {int(k): v for k, v in gen.counters.exits.items()}
    return best


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
    ap.add_argument("--e2e-tokens", type=int, default=128, help="tokens generated in the end-to-end comparison")
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
            if kind.startswith("gguf"):  # gguf-QUANT (segments) or gguf-QUANT-whole (one file)
                from edge.export.gguf import export_gguf
                from edge.export.segments import export_segments

                quant = kind.split("-", 1)[1].removesuffix("-whole")
                whole = Path(tmp) / f"edge-{kind}.whole.gguf"  # also the plain-llama.cpp reference
                export_gguf(ckpt, quant, whole)
                gguf = whole if kind.endswith("-whole") else export_segments(ckpt, quant,
                                                                             Path(tmp) / f"edge-{kind}")
            shared = [x for k in ("threads", "prompt", "tokens", "repeats", "text_tokens", "e2e_tokens")
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
                files = sorted(gguf.glob("layers-*.gguf")) if gguf.is_dir() else [gguf]
                rows[kind]["file_mib"] = sum(f.stat().st_size for f in files) / 2**20
    ref = rows.get("torch", {}).get("top1")
    base_tps = rows.get("torch", {}).get("tps")
    cols = ["tok/s", "x fp32", "RSS MiB", "file MiB", "top-1 vs fp32", "skipped", "saved", "capture/plain", "e2e tok/s",
            "llama tok/s", "e2e/llama", "torch/plain"]
    print("\n| backend | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for kind, r in rows.items():
        agree = (sum(a == b for a, b in zip(r["top1"], ref)) / len(ref)) if ref else float("nan")

        def f(key, fmt, r=r):
            return format(r[key], fmt) if key in r else "-"

        cells = [f"{r['tps']:.1f}", f"{r['tps'] / base_tps:.2f}" if base_tps else "-", f"{r['rss_mib']:.1f}",
                 f("file_mib", ".1f"), f"{agree:.1%}", f("skipped", ".1%"), f("saved", ".1%"),
                 f("capture_ratio", ".2f"),
                 f("edge_tps", ".0f"), f("llama_tps", ".0f"), f("e2e_ratio", ".2f"), f("torch_vs_plain", ".2f")]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    n = len(ref) if ref else 0
    policy = next((r["policy"] for r in rows.values() if "policy" in r), "-")
    print(f"\ntop-1: split exit (layer {args.split}) argmax, teacher-forced over {n} held-out tokens. skipped: edge "
          f"layer-tokens that exits kept off each token's own step, over that text (policy: {policy}); saved: those "
          f"never run by its end (KV catch-up runs the rest, batched with the next deeper token). "
          f"capture/plain: a decode step through "
          f"the layout's contexts with the C capture over a plain llama.cpp step of one whole GGUF of the same "
          f"weights. e2e/llama: EdgeClient standalone tokens/s over llama_cpp create_completion on that GGUF "
          f"({args.e2e_tokens} tokens). torch/plain: the torch backend's step over a plain-PyTorch step "
          f"(bench/torch_step.py; a ratio, lower is better). Best of {args.repeats}, {args.threads} threads.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
