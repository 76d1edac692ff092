"""Quant mixes for the llama.cpp edge: file size, decode speed vs torch fp32, split-exit top-1 agreement.

Per choice (plain q4_0 / q4_k_m, token_embd + output at q8_0, + imatrix, + layer 0 at q8_0, the best mix
`q4-mix`, q8_0 and f16 for reference), exported from one checkpoint with edge/export/gguf.py:
- file MiB of the edge GGUF;
- tok/s: the edge backend (make_backend("gguf"), `--threads` threads) decoding one token per step after a
  `--prompt`-token prompt, all edge exits evaluated, best of `--repeats`; x fp32: over make_backend("torch")
  (fp32) doing the same, one backend alive at a time (torch measured first and last);
- top-1: agreement of the split exit's argmax with torch fp32, teacher-forced over >= `--text-tokens` tokens
  of `--text` (every k-th document, up to `--chunk` tokens each, so all held-out packages count). Both sides
  score whole chunks at once: torch runs the edge stage over the chunk, llama.cpp decodes it with logits for
  every row (its own output head, the same kernels as one-token steps).
The imatrix comes from `--imatrix`, or is computed from `--calib` text (keep it disjoint from `--text`).

    python bench/quant_mix.py --model models/coexit-code-small --text data/corpus/heldout.jsonl \\
        --calib data/corpus/train.jsonl [--phase agree|emit|speed|all --state FILE.json]

--phase emit adds the product's view: in collaborative mode with the model's calibrated policy, the share of
positions the quantized edge emits and the share of all emitted tokens (the edge's, and the cloud's computed from
that edge's split rows) equal to the fp32 system's.

The "policy B bpw" choices are `coexit compress` policies (edge/export/policy.py) chosen for budget B from the
model's measured sensitivity (MODEL/quant_sensitivity.json, or --sensitivity), next to the uniform types and the
hand-made mixes; `--plot FILE.png` draws layer bits per weight against emitted = fp32 (needs --phase emit).

--phase lets the agreement (slow, no timing) and the timing (short) run separately, e.g. the timing while other
jobs on the machine are paused; both write to --state and the table is printed once it holds both.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: export_gguf keyword arguments ("IM" = the imatrix)
CHOICES = {
    "q4_0": {"quant": "q4_0", "imatrix": False},
    "q4_k_m": {"quant": "q4_k_m", "imatrix": False},
    "q4_0 +embd/out q8_0": {"quant": "q4_0", "imatrix": False, "embd": "q8_0", "output": "q8_0"},
    "q4_0 +imatrix": {"quant": "q4_0", "imatrix": "IM"},
    "q4_0 +embd/out +imatrix": {"quant": "q4_0", "imatrix": "IM", "embd": "q8_0", "output": "q8_0"},
    "q4_0 +embd/out +blk.0": {"quant": "q4_0", "imatrix": False, "embd": "q8_0", "output": "q8_0",
                              "keep_layers": (0,)},
    "q4_0 +embd/out +blk.0 +im": {"quant": "q4_0", "imatrix": "IM", "embd": "q8_0", "output": "q8_0",
                                  "keep_layers": (0,)},
    "q4-mix (no imatrix)": {"quant": "q4-mix", "imatrix": False},
    "q4-mix": {"quant": "q4-mix", "imatrix": "IM"},
    "q4-mix +blk.3": {"quant": "q4-mix", "imatrix": "IM", "keep_layers": (0, 3)},
    "q4-mix +blk.1": {"quant": "q4-mix", "imatrix": "IM", "keep_layers": (0, 1)},
    "q4-mix with output f16": {"quant": "q4-mix", "imatrix": "IM", "output": "f16"},
    "q4-mix +attn/ffn_down q8_0 with output f16": {"quant": "q4-mix", "imatrix": "IM", "output": "f16",
                                                   "keep_tensors": ("attn_q", "attn_k", "attn_v", "attn_output",
                                                                    "ffn_down")},
    "q8_0 with output f16": {"quant": "q8_0", "output": "f16"},
    "q4-mix with embd/out f16": {"quant": "q4-mix", "imatrix": "IM", "embd": "f16", "output": "f16"},
    "q4-mix with blk.0 f16": {"quant": "q4-mix", "imatrix": "IM", "keep_type": "f16"},
    "q4-mix +attn q8_0": {"quant": "q4-mix", "imatrix": "IM",
                          "keep_tensors": ("attn_q", "attn_k", "attn_v", "attn_output")},
    "q4-mix +attn/ffn_down q8_0": {"quant": "q4-mix", "imatrix": "IM",
                                   "keep_tensors": ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_down")},
    "embd/out q8_0 + layers q5_k": {"quant": "q4-mix", "imatrix": "IM", "keep_layers": (0, 1, 2, 3),
                                    "keep_type": "q5_k"},
    "embd/out q8_0 + layers q6_k": {"quant": "q4-mix", "imatrix": "IM", "keep_layers": (0, 1, 2, 3),
                                    "keep_type": "q6_k"},
    "q8_0": {"quant": "q8_0"},
    "f16": {"quant": "f16"},
    # coexit compress's policies (edge/export/policy.py) from MODEL/quant_sensitivity.json (or --sensitivity)
    **{f"policy {b} bpw": {"policy_bpw": b} for b in (4.5, 5.0, 5.5, 6.0, 6.2, 7.0)},
    # ... plus export-edge --learned-rounding 300 (edge/export/rounding.py; needs --rounding-calib)
    **{f"policy {b} bpw +rounding": {"policy_bpw": b, "rounding": 300} for b in (4.5, 5.0, 6.2)},
    # ... or export-edge --qat STEPS (edge/export/qat.py; --qat-steps, calibration text from --rounding-calib)
    **{f"policy {b} bpw +qat": {"policy_bpw": b, "qat": True} for b in (4.5, 5.0, 5.5, 6.0, 6.2, 7.0)},
    "embd/out q8_0 + layers iq4_nl": {"quant": "q4-mix", "imatrix": "IM", "keep_layers": (0, 1, 2, 3),
                                      "keep_type": "iq4_nl"},
}


def export_choice(model_dir: Path, name: str, out: Path, threads: int, im: Path | None,
                  sensitivity: Path | None = None, rounding_calib: str | None = None, qat_steps: int = 0) -> Path:
    """The choice's edge GGUF: a CHOICES entry's export_gguf arguments ("IM" = the imatrix), or a policy chosen
    for its budget from the measured sensitivity (then learned rounding or quantization-aware fine-tuning when
    the entry asks for it)."""
    from edge.export.gguf import export_gguf

    kw = CHOICES[name]
    if "policy_bpw" in kw:
        from edge.export.policy import choose
        from edge.export.sensitivity import SENSITIVITY_FILE, Sensitivity

        policy = choose(Sensitivity.load(sensitivity or model_dir / SENSITIVITY_FILE), kw["policy_bpw"])
        if kw.get("qat"):
            from edge.export.qat import export_qat

            if not rounding_calib or not qat_steps:
                raise SystemExit(f"{name}: pass --rounding-calib TEXT (calibration text, not --text) and --qat-steps")
            return export_qat(model_dir, policy, out, threads, steps=qat_steps, text=[rounding_calib],
                              log=lambda m: print(m, file=sys.stderr, flush=True))
        if kw.get("rounding"):
            from edge.export.rounding import export_rounded

            if not rounding_calib:
                raise SystemExit(f"{name}: pass --rounding-calib TEXT (calibration text, not --text)")
            return export_rounded(model_dir, "policy", out, threads, steps=kw["rounding"], text=[rounding_calib],
                                  policy=policy, log=lambda m: print(m, file=sys.stderr, flush=True))
        return export_gguf(model_dir, out=out, threads=threads, policy=policy)
    return export_gguf(model_dir, out=out, threads=threads, **{k: (im if v == "IM" else v) for k, v in kw.items()})


def frontier_png(rows: dict, names: list[str], path: Path) -> None:
    """Bits per weight of the edge layers (as stored) against emitted = fp32: the policies as a line, every
    other choice as a labelled point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for suffix, color, label in (("bpw", "tab:red", "coexit compress policy"),
                                 ("+rounding", "tab:purple", "policy + --learned-rounding 300"),
                                 ("+qat", "tab:green", "policy + --qat (quantization-aware fine-tuning)")):
        pol = sorted((rows[n]["bpw"], rows[n]["emit_agree"]) for n in names
                     if n.startswith("policy ") and n.endswith(suffix))
        if pol:
            ax.plot(*zip(*pol), "o-", color=color, label=label)
    for n in names:
        if not n.startswith("policy ") and rows[n]["bpw"] < 17:
            ax.plot(rows[n]["bpw"], rows[n]["emit_agree"], "s", color="tab:blue")
            ax.annotate(n, (rows[n]["bpw"], rows[n]["emit_agree"]), fontsize=7, xytext=(4, -9),
                        textcoords="offset points")
    ax.set_xlabel("edge-layer bits per weight, as stored")
    ax.set_ylabel("emitted tokens = fp32 system's")
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("Edge quantization frontier (collaborative mode, held-out tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def eval_chunks(model_dir: Path, text: str, tokens: int, chunk: int) -> list[list[int]]:
    """The first `chunk` tokens (at least 32) of documents spread over the held-out text."""
    from coexit.textdata import read_documents, spread_chunks
    from coexit.tokenizer import Tokenizer

    tok = Tokenizer.from_file(model_dir / "tokenizer.json")
    return spread_chunks(tok, read_documents([text]), tokens, chunk, per_doc=1, min_len=32)


@torch.no_grad()
def torch_top1(model_dir: Path, chunks: list[list[int]]) -> np.ndarray:
    from edge.backends.registry import make_backend

    b = make_backend("torch", model_dir)
    stage = b.model.stage(0, b.split)
    return np.concatenate([stage(torch.tensor([ids]), exits=[b.split]).exit_logits[b.split][0].argmax(-1).numpy()
                           for ids in chunks])


def llama_top1(path: Path, chunks: list[list[int]], threads: int) -> np.ndarray:
    """llama.cpp's own logits (the GGUF's output head = the split exit) for every row, teacher-forced."""
    from edge.llamacpp.lib import llama, model_params

    lc = llama()
    model = lc.llama_model_load_from_file(str(path).encode(), model_params(path))
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    n = max(map(len, chunks))
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = max(n, 64), n, n, 1
    cp.n_threads = cp.n_threads_batch = threads
    ctx = lc.llama_init_from_model(model, cp)
    batch = lc.llama_batch_init(n, 0, 1)
    out = []
    try:
        for ids in chunks:
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
            batch.n_tokens = len(ids)
            for i, t in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
                batch.seq_id[i][0] = 0
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError(f"llama_decode failed on {path}")
            ptr = lc.llama_get_logits(ctx)
            logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                           shape=(len(ids), n_vocab))
            out.append(logits.argmax(-1))
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
        lc.llama_model_free(model)
    return np.concatenate(out)


def layer_bpw(path: Path) -> float:
    """Bits per weight of the edge layers' matrices as stored (llama.cpp's fallbacks included: q4_k_m keeps
    matrices whose rows are not a multiple of 256 wide at q5_0, 5.5 bits)."""
    import gguf

    ts = [t for t in gguf.GGUFReader(str(path)).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return 8 * sum(int(t.n_bytes) for t in ts) / sum(int(t.n_elements) for t in ts)


def llama_edge_passes(path: Path, chunks: list[list[int]], threads: int):
    """The whole-layout edge GGUF over each chunk, teacher-forced, as the product's llama.cpp backend computes it
    (one context, cleared between chunks): yields per edge exit its logits (T, V) and the residual after it
    (T, C); the split exit's logits are llama.cpp's own, earlier exits' come from their Python heads on the
    captured layer outputs."""
    from edge.backends.gguf_heads import read_edge_gguf
    from edge.backends.llamacpp import LlamaSession

    meta = read_edge_gguf(path)
    exits, n = meta.config.edge_exit_layers, max(map(len, chunks))
    s = LlamaSession(path, max(n, 64), threads, n, capture=[e - 1 for e in exits],
                     kv_type="f16", flash_attn=True)  # the backend's defaults
    try:
        for ids in chunks:
            s.clear()
            s.decode(ids, 0)
            ptr = s.lc.llama_get_logits(s.ctx)
            split_logits = torch.from_numpy(np.ctypeslib.as_array(
                ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(len(ids), s.n_vocab)).copy())
            hidden = {e: torch.from_numpy(s.take_captured(e - 1).copy()) for e in exits}
            yield {e: split_logits if e == meta.config.split_layer else meta.heads[e](hidden[e]) for e in exits}, \
                hidden
    finally:
        s.close()


def emitted(policy, exits: list[int], logits: dict, hidden: dict, cloud_top: torch.Tensor):
    """Collaborative mode, position by position: the policy's decisions at the edge exits (in order, as
    EdgeClient asks them), and the emitted token: the accepting exit's top-1, else the cloud's (cloud_top)."""
    out, at_edge = cloud_top.clone(), torch.zeros(cloud_top.shape[0], dtype=torch.bool)
    for t in range(cloud_top.shape[0]):
        for e in exits:
            if policy.checks(e) and policy.decide(e, logits[e][t], hidden[e][t]):
                out[t], at_edge[t] = logits[e][t].argmax(), True
                break
    return out, at_edge


@torch.no_grad()
def emit_agreement(model_dir: Path, chunks: list[list[int]], paths: dict[str, Path], threads: int) -> dict:
    """For the fp32 edge and each GGUF edge, in collaborative mode with the model's calibrated policy: the share
    of positions emitted at the edge, and the share of emitted tokens equal to the fp32 full model's top-1. The
    cloud's token comes from fp32 deep layers on *that edge's* split rows (every row reaches the cloud, as in
    collaborative mode with exact KV), so a quantized edge shows up in both the edge's and the cloud's tokens."""
    import coexit
    from edge.policy.calibrate import exit_pass, load_policy

    model = coexit.load(model_dir, dtype=torch.float32)
    policy = load_policy(model_dir)
    cfg = model.config
    exits, split, n = cfg.edge_exit_layers, cfg.split_layer, cfg.num_hidden_layers
    stats = {name: [0, 0, 0] for name in ["torch fp32", *paths]}  # positions, at edge, emitted == reference

    def count(name: str, logits: dict, hidden: dict, cloud: torch.Tensor, ref: torch.Tensor) -> None:
        out, at_edge = emitted(policy, exits, logits, hidden, cloud)
        st = stats[name]
        st[0], st[1], st[2] = st[0] + len(ref), st[1] + int(at_edge.sum()), st[2] + int((out == ref).sum())

    refs = []  # the fp32 full model's top-1 per chunk
    for ids in chunks:
        logits, hidden, final = exit_pass(model, torch.tensor([ids]), exits)
        refs.append(final.argmax(-1))
        count("torch fp32", logits, hidden, refs[-1], refs[-1])
    for name, p in paths.items():  # one llama.cpp context at a time
        for (logits, hidden), ref in zip(llama_edge_passes(p, chunks, threads), refs):
            count(name, logits, hidden, model.run_layers(hidden[split][None], None, None, split, n).logits[0]
                  .argmax(-1), ref)
    return {name: {"edge_share": e / t, "emit_agree": a / t} for name, (t, e, a) in stats.items()}


def decode_tps(backends: dict[str, object], prompt: list[int], tokens: int, repeats: int) -> dict[str, float]:
    best = dict.fromkeys(backends, 0.0)
    for _ in range(repeats):
        for name, b in backends.items():
            b.reset()
            b.step(prompt, 0, None)
            pos, tok = len(prompt), prompt[-1]
            t0 = time.perf_counter()
            for _ in range(tokens):
                r = b.step([tok], pos, None)
                tok, pos = int(r.exit_logits[b.split].argmax()), pos + 1
            best[name] = max(best[name], tokens / (time.perf_counter() - t0))
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--text", required=True, help="held-out evaluation text (file, directory or .jsonl)")
    ap.add_argument("--calib", help="calibration text for the imatrix (disjoint from --text)")
    ap.add_argument("--imatrix", help="an imatrix GGUF instead of --calib (default MODEL/imatrix.gguf)")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--text-tokens", type=int, default=4096, help="teacher-forced tokens scored (>= 2000)")
    ap.add_argument("--chunk", type=int, default=256, help="tokens per scored document")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64, help="timed decode steps")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--choices", default=",".join(CHOICES), help="comma-separated names from CHOICES")
    ap.add_argument("--phase", default="all", choices=["agree", "emit", "speed", "all"])
    ap.add_argument("--state", help="JSON file holding the results of each phase (default: a temporary one)")
    ap.add_argument("--workdir", help="where the GGUFs are written (default: a temporary directory)")
    ap.add_argument("--sensitivity", help="the policies' measured sensitivity (default MODEL/quant_sensitivity.json)")
    ap.add_argument("--rounding-calib", help="calibration text for the +rounding and +qat choices (disjoint from "
                                             "--text)")
    ap.add_argument("--qat-steps", type=int, default=0, help="fine-tuning steps of the +qat choices")
    ap.add_argument("--plot", help="write the frontier (layer bpw against emitted = fp32) to this PNG")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from edge.backends.registry import make_backend
    from edge.export.gguf import IMATRIX_FILE

    model_dir = Path(args.model)
    names = args.choices.split(",")
    tmp = tempfile.TemporaryDirectory()
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    state_path = Path(args.state) if args.state else work / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"rows": {}}
    chunks = eval_chunks(model_dir, args.text, args.text_tokens, args.chunk)
    paths = {name: work / f"edge-{re.sub(r'[^a-z0-9.]+', '-', name.lower()).strip('-')}.gguf" for name in names}

    sens = Path(args.sensitivity) if args.sensitivity else None

    def exported(name: str) -> Path:  # the choice's GGUF, exported unless an earlier phase left it in --workdir
        if not paths[name].is_file():
            im_path = Path(state.get("imatrix") or args.imatrix or model_dir / IMATRIX_FILE)
            export_choice(model_dir, name, paths[name], args.threads, im_path, sens, args.rounding_calib,
                          args.qat_steps)
        return paths[name]

    if args.phase in ("agree", "all"):
        im = Path(args.imatrix) if args.imatrix else model_dir / IMATRIX_FILE
        if not args.imatrix and args.calib:
            from edge.export.imatrix import compute

            im = compute(model_dir, [args.calib], args.calib_tokens, threads=args.threads).save(work / IMATRIX_FILE)
        if not im.is_file() and any(CHOICES[n].get("imatrix") == "IM" for n in names):
            ap.error(f"no imatrix: pass --calib TEXT or --imatrix FILE (or put one at {im})")
        ref = torch_top1(model_dir, chunks)
        for name in names:
            if CHOICES[name].get("qat") and paths[name].is_file():  # trained earlier (e.g. by coexit export-edge
                path = paths[name]                                   # --qat into --workdir): not trained again
            else:
                path = export_choice(model_dir, name, paths[name], args.threads, im, sens, args.rounding_calib,
                                     args.qat_steps)
            agree = float((llama_top1(path, chunks, args.threads) == ref).mean())
            state["rows"].setdefault(name, {}).update(file_mib=path.stat().st_size / 2**20, top1=agree,
                                                      bpw=layer_bpw(path))
            print(f"{name}: top-1 {agree:.2%}", file=sys.stderr, flush=True)
        state.update(eval_tokens=int(ref.size), eval_chunks=len(chunks), imatrix=str(im), calib=args.calib,
                     text=args.text)
        state_path.write_text(json.dumps(state, indent=1))

    if args.phase in ("emit", "all"):
        for name in names:
            exported(name)
        res = emit_agreement(model_dir, chunks, paths, args.threads)
        state["emit_fp32"] = res.pop("torch fp32")
        for name, r in res.items():
            state["rows"].setdefault(name, {}).update(r)
            print(f"{name}: edge share {r['edge_share']:.2%}, emitted = fp32 {r['emit_agree']:.2%}",
                  file=sys.stderr, flush=True)
        state_path.write_text(json.dumps(state, indent=1))

    if args.phase in ("speed", "all"):
        for name in names:
            exported(name)
        # one backend alive at a time: idle llama.cpp contexts' worker threads would spin and steal the CPU
        prompt, tps = chunks[0][: args.prompt], {}
        for name in ["torch fp32", *names, "torch fp32"]:  # torch first and last: the best of both counts
            b = (make_backend("torch", model_dir, max_len=1024) if name == "torch fp32" else
                 make_backend("gguf", paths[name], n_threads=args.threads, max_len=1024))
            tps[name] = max(tps.get(name, 0.0), decode_tps({name: b}, prompt, args.tokens, args.repeats)[name])
            getattr(b, "close", lambda: None)()
            del b
        state["torch_tps"] = tps.pop("torch fp32")
        for name, v in tps.items():
            state["rows"].setdefault(name, {})["tps"] = v
        state_path.write_text(json.dumps(state, indent=1))

    rows = state["rows"]
    cols = [  # (header, width, row key, format) of the phases that every chosen row has results of
        c for c in (("file MiB", 8, "file_mib", "8.2f"), ("layer bpw", 9, "bpw", "9.2f"), ("tok/s", 8, "tps", "8.1f"),
                    ("x fp32", 7, "x", "7.2f"),
                    ("top-1 vs fp32", 13, "top1", "13.2%"), ("edge share", 10, "edge_share", "10.1%"),
                    ("emitted = fp32", 14, "emit_agree", "14.2%"))
        if all(c[2] in rows.get(n, {}) or (c[2] == "x" and "tps" in rows.get(n, {})) for n in names)]
    if not cols:
        print(f"results so far in {state_path}")
        return 0
    for n in names:
        if "tps" in rows[n]:
            rows[n]["x"] = rows[n]["tps"] / state["torch_tps"]
    print(f"model: {model_dir}; edge GGUF (llama.cpp), {args.threads} threads" +
          (f"; torch fp32 edge {state['torch_tps']:.1f} tok/s" if "torch_tps" in state else ""))
    print(f"\n{'choice':28s} " + " ".join(f"{h:>{w}s}" for h, w, _, _ in cols))
    for name in names:
        print(f"{name:28s} " + " ".join(format(rows[name][k], f) for _, _, k, f in cols))
    print(f"\ntop-1: split exit argmax vs torch fp32, teacher-forced over {len(sum(chunks, []))} tokens of "
          f"{args.text} ({len(chunks)} documents, up to {args.chunk} tokens each); imatrix from "
          f"{state.get('calib') or state.get('imatrix') or model_dir / IMATRIX_FILE}; " +
          (f"tok/s: one-token edge steps after a {args.prompt}-token prompt, {args.tokens} steps, best of "
           f"{args.repeats}; " if "torch_tps" in state else "") +
          "layer bpw: bits per weight of the edge layers' matrices as stored. embd/out = token_embd and output at "
          "q8_0; blk.0 = layer 0 at q8_0; q4-mix = q4_k_m + embd/out + blk.0 (edge/export/gguf.py MIXES)")
    if args.plot and all("emit_agree" in rows[n] and "bpw" in rows[n] for n in names):
        frontier_png(rows, names, Path(args.plot))
    if "emit_fp32" in state:
        e = state["emit_fp32"]
        print(f"edge share / emitted = fp32: collaborative mode with the model's calibrated policy, teacher-forced "
              f"over the same tokens; the cloud runs fp32 deep layers on each edge's own split rows; emitted = "
              f"fp32 counts tokens equal to the fp32 full model's top-1. The torch fp32 edge: edge share "
              f"{e['edge_share']:.1%}, emitted = fp32 {e['emit_agree']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
