"""Compression policies for the bitsandbytes edge (#25): uniform NF4 and int8 next to `coexit compress --backend bnb`
policies, by the measures of bench/quant_mix.py.

Each choice is the fp32 model with its edge blocks [0, split) quantized as edge/backends/bnb.py quantizes them (one
mode, or a policy's type per matrix), the deep layers fp32 as the cloud runs them; teacher-forced over the held-out
tokens of bench/quant_mix.py: the split exit's top-1 vs fp32, and emitted = fp32 in collaborative mode with the
model's calibrated policy. Layer bpw: the bytes bitsandbytes holds for the edge matrices (codes and fp32 scales).

    python bench/bnb_policy.py --model models/coexit-code-small --text data/corpus/heldout.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quant_mix import emitted, eval_chunks  # noqa: E402


@torch.no_grad()
def score(model, ref_model, policy, chunks) -> tuple[float, float]:
    from edge.policy.calibrate import exit_pass

    exits, split = model.config.edge_exit_layers, model.config.split_layer
    n = top = emit = 0
    for ids in chunks:
        x = torch.tensor([ids])
        ref_logits, _, ref_final = exit_pass(ref_model, x, exits)  # the split is an edge exit
        logits, hidden, final = exit_pass(model, x, exits)
        ref = ref_final.argmax(-1)
        tokens, _ = emitted(policy, exits, logits, hidden, final.argmax(-1))
        n += len(ids)
        top += int((logits[split].argmax(-1) == ref_logits[split].argmax(-1)).sum())
        emit += int((tokens == ref).sum())
    return top / n, emit / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True, help="held-out evaluation text")
    ap.add_argument("--text-tokens", type=int, default=8192)
    ap.add_argument("--budgets", default="5.0,6.0,7.0")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import coexit
    from edge.backends.bnb import quantize_layers
    from edge.export.policy import choose
    from edge.export.quant_types import tensor_bytes
    from edge.export.sensitivity import SENSITIVITY_FILE, Sensitivity
    from edge.policy.calibrate import load_policy

    model_dir = Path(args.model)
    chunks = eval_chunks(model_dir, args.text, args.text_tokens, 256)
    exit_policy = load_policy(model_dir)
    sens = Sensitivity.load(model_dir / SENSITIVITY_FILE)
    ref = coexit.load(model_dir, dtype=torch.float32)
    shapes = {n: e["shape"] for n, e in sens.tensors.items()}
    weights = sum(r * c for r, c in shapes.values())
    rows = []
    for name, mode, pol in [("bnb-nf4", "nf4", None), ("bnb-int8", "int8", None),
                            *[(f"policy {b} bpw", "nf4", choose(sens, float(b), backend="bnb"))
                              for b in args.budgets.split(",")]]:
        model = coexit.load(model_dir, dtype=torch.float32)
        quantize_layers(model, mode, model.config.split_layer, pol)
        types = pol.types if pol else dict.fromkeys(shapes, name)
        bpw = 8 * sum(tensor_bytes(t, *shapes[n]) for n, t in types.items()) / weights
        top, emit = score(model, ref, exit_policy, chunks)
        rows.append((name, bpw, top, emit))
        print(f"{name}: top-1 {top:.2%}, emitted = fp32 {emit:.2%}", file=sys.stderr, flush=True)
    print(f"model: {model_dir}; bitsandbytes edge blocks, fp32 deep layers; {sum(map(len, chunks))} held-out tokens "
          f"of {args.text}\n")
    print(f"{'choice':20s} {'layer bpw':>9s} {'top-1 vs fp32':>13s} {'emitted = fp32':>14s}")
    for name, bpw, top, emit in rows:
        print(f"{name:20s} {bpw:9.2f} {top:13.2%} {emit:14.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
