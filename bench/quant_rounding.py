"""Learned rounding on llama.cpp's own grid: how much split-exit top-1 agreement the codes alone buy back.

An experiment behind #14's Q4 line (bench/results/quant_mix.txt), kept so that its figures can be reproduced.
For every matrix of a quantized edge GGUF (edge/export/gguf.py), the block scales and mins that llama.cpp's
quantizer chose are kept and only the integer codes are chosen anew:
- latent weights w = w_fp32 + a * delta (a: the element's grid step), whose nearest grid value the forward pass
  uses (straight-through gradient), trained with Adam to minimise KL(fp32 split exit || quantized split exit) on
  calibration text; the file's f32 RMSNorm weights train too;
- the codes are written back into the GGUF's blocks in place (Q8_0, Q4_0, IQ4_NL, Q5_0, Q5_1, Q4_K, Q6_K; every
  rewritten tensor is checked against gguf-py's dequantizer), and llama.cpp's own logits are scored.
The method lives in edge/export/rounding.py, where `coexit export-edge --learned-rounding STEPS` runs it.

    python bench/quant_rounding.py --model models/coexit-code-small --quant q4-mix \\
        --calib data/corpus/train.jsonl --text data/corpus/heldout.jsonl [--steps 300]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quant_mix import emit_agreement, eval_chunks, llama_top1, torch_top1  # noqa: E402
from edge.export.rounding import tune  # noqa: E402  (the method, also `coexit export-edge --learned-rounding`)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--quant", default="q4-mix", help="an export_gguf quant or mix (default q4-mix)")
    ap.add_argument("--calib", required=True, help="calibration text (disjoint from --text)")
    ap.add_argument("--text", required=True, help="held-out evaluation text")
    ap.add_argument("--calib-tokens", type=int, default=65536)
    ap.add_argument("--text-tokens", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3, help="Adam step, in grid steps")
    ap.add_argument("--scales", action="store_true", help="train the f16 scale of each 32-weight block too")
    ap.add_argument("--system", action="store_true",
                    help="also match the final head computed by the fp32 deep layers on the edge's split rows")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from coexit.textdata import read_documents, spread_chunks
    from coexit.tokenizer import Tokenizer
    from edge.export.gguf import export_gguf, sidecar_path

    model_dir = Path(args.model)
    tok = Tokenizer.from_file(model_dir / "tokenizer.json")
    calib = [c for c in spread_chunks(tok, read_documents([args.calib]), args.calib_tokens, args.seq)
             if len(c) == args.seq]
    chunks = eval_chunks(model_dir, args.text, args.text_tokens, 256)
    ref = torch_top1(model_dir, chunks)
    with tempfile.TemporaryDirectory() as tmp:
        first = export_gguf(model_dir, args.quant, Path(tmp) / "edge.gguf", args.threads)
        path = Path(shutil.copy(first, Path(tmp) / "tuned.gguf"))
        if sidecar_path(first).exists():
            shutil.copy(sidecar_path(first), sidecar_path(path))
        before = float((llama_top1(first, chunks, args.threads) == ref).mean())
        tune(model_dir, path, calib, args.steps, args.lr, args.batch, scales=args.scales, system=args.system,
             log=lambda m: print(m, file=sys.stderr))
        after = float((llama_top1(path, chunks, args.threads) == ref).mean())
        emit = emit_agreement(model_dir, chunks, {"before": first, "after": path}, args.threads)
    learned = ("codes and scales" if args.scales else "codes") + (", system loss" if args.system else "")
    print(f"{args.quant}: split-exit top-1 vs torch fp32 over {ref.size} held-out tokens: llama.cpp's codes "
          f"{before:.2%}, learned {learned} ({args.steps} steps x {args.batch} x {args.seq} tokens of "
          f"{len(calib)} calibration sequences) {after:.2%}")
    print(f"emitted = fp32 (collaborative mode, calibrated policy; bench/quant_mix.py --phase emit): fp32 edge "
          f"{emit['torch fp32']['emit_agree']:.2%}, llama.cpp's codes {emit['before']['emit_agree']:.2%}, learned "
          f"{emit['after']['emit_agree']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
