"""Layer dropping, measured: what leaving one edge layer out costs in the tokens the system emits (#25, item 6).

Edge-LLM prunes; llama.cpp has no sparse kernels, so the only pruning a GGUF edge can run is a whole layer left out
(a file with one block fewer). This measures it in fp32 torch, which is that file's arithmetic without rounding:
for each edge layer i, the model with layer i replaced by the identity (the residual passes through), in
collaborative mode with the model's calibrated policy, teacher-forced over the held-out tokens of
bench/quant_mix.py: the split exit's top-1 vs the fp32 model, and emitted = fp32 (edge tokens, and the cloud's
computed by the fp32 deep layers from the dropped edge's split rows). Next to it, the measured damage of the
same drop (edge/export/sensitivity.py's `drops`) and that of the whole edge at 4-bit (the sum over tensors).

    python bench/layer_drop.py --model models/coexit-code-small --text data/corpus/heldout.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quant_mix import emitted, eval_chunks  # noqa: E402


class Skip(torch.nn.Module):
    def forward(self, hidden, *args, **kw):
        return hidden


@torch.no_grad()
def measure(model_dir: Path, chunks: list[list[int]]) -> dict:
    import coexit
    from edge.policy.calibrate import exit_pass, load_policy

    model = coexit.load(model_dir, dtype=torch.float32)
    policy = load_policy(model_dir)
    cfg = model.config
    exits, split = cfg.edge_exit_layers, cfg.split_layer
    refs = []
    for ids in chunks:
        logits, hidden, final = exit_pass(model, torch.tensor([ids]), exits)
        refs.append((final.argmax(-1), logits[split].argmax(-1)))
    out = {}
    for i in [None, *range(split)]:
        keep = model.model.layers[str(i)] if i is not None else None
        if i is not None:
            model.model.layers[str(i)] = Skip()
        n = top = emit = 0
        for ids, (ref, ref_split) in zip(chunks, refs):
            logits, hidden, final = exit_pass(model, torch.tensor([ids]), exits)
            tokens, _ = emitted(policy, exits, logits, hidden, final.argmax(-1))
            n, top, emit = n + len(ref), top + int((logits[split].argmax(-1) == ref_split).sum()), \
                emit + int((tokens == ref).sum())
        if i is not None:
            model.model.layers[str(i)] = keep
        out["none" if i is None else str(i)] = {"top1": top / n, "emit_agree": emit / n, "tokens": n}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True, help="held-out evaluation text")
    ap.add_argument("--text-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from edge.export.sensitivity import SENSITIVITY_FILE, Sensitivity

    model_dir = Path(args.model)
    chunks = eval_chunks(model_dir, args.text, args.text_tokens, 256)
    res = measure(model_dir, chunks)
    sens_path = model_dir / SENSITIVITY_FILE
    sens = Sensitivity.load(sens_path) if sens_path.is_file() else None
    print(f"model: {model_dir}; fp32 torch edge; {res['none']['tokens']} held-out tokens of {args.text}\n")
    print(f"{'edge layer dropped':20s} {'top-1 vs fp32':>13s} {'emitted = fp32':>14s} {'measured damage':>15s}")
    for k, r in res.items():
        dmg = ""
        if sens is not None and k in sens.drops:
            dmg = f"{sum(v for c, v in sens.drops[k].items() if c != 'split_mse'):15.4f}"
        print(f"{k:20s} {r['top1']:13.2%} {r['emit_agree']:14.2%} {dmg}")
    if sens is not None:
        q4 = sum(sens.damage(n, "iq4_nl") for n in sens.tensors)
        print(f"\nmeasured damage (sum of KLs at the edge exits and the final head, calibration text): every edge "
              f"matrix at iq4_nl {q4:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
