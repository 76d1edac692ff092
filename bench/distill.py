"""What exit self-distillation does: EE-tune the default model's exit heads from the same start with and without a
`distill` weight (KL from the final head to each exit), then measure per-exit agreement with the final head and
top-1 accuracy on held-out data, beside the starting model. Prints a table (the model card's).

    python bench/distill.py [--steps 150] [--distill 1.0] [--model models/coexit-code-small]

Needs data/tokens (`coexit prepare-data ... --tokenizer MODEL/tokenizer.json`, written here when missing) and the
held-out corpus (`coexit build-corpus --out data/corpus`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def job(model: Path, data: Path, out: Path, steps: int, distill: float, own_heads: bool) -> str:
    heads = "share_lm_head = false  # each exit gets its own projection, initialised from the LM head" if own_heads \
        else ""
    return f"""
[model]
source = "{model}"
{heads}
[data]
path = "{data}"
seq_len = 256
[train]
mode = "ee-tune"
steps = {steps}
micro_batch_size = 8
lr = 1e-3
min_lr = 1e-4
lr_warmup_steps = 10
distill = {distill}
log_every = 25
progress = false
[parallel]
pp = 1
[export]
dir = "{out}"
"""


def metrics(model_dir: Path, heldout: Path, max_tokens: int) -> dict:
    from coexit.checkpoint import load
    from coexit.evaluation import head_metrics
    from coexit.textdata import read_documents

    model = load(model_dir, dtype=torch.float32)
    ids: list[int] = []
    for doc in read_documents([heldout]):
        ids += model.tokenizer.encode(doc, add_bos=True)
        if len(ids) >= max_tokens:
            break
    return head_metrics(model, ids[:max_tokens], 256)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "coexit-code-small"))
    ap.add_argument("--data", default=str(ROOT / "data" / "tokens-default"))
    ap.add_argument("--corpus", default=str(ROOT / "data" / "corpus"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "distill"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--distill", type=float, default=1.0)
    ap.add_argument("--eval-tokens", type=int, default=30000)
    ap.add_argument("--own-heads", action="store_true",
                    help="give the exits projections of their own (else only their norms train when the model "
                         "shares its LM head)")
    args = ap.parse_args(argv)
    from training.data import prepare
    from training.launch import launch

    model, data, out = Path(args.model), Path(args.data), Path(args.out).resolve()
    if not (data / "meta.json").is_file():
        print(f"tokenizing {args.corpus}/train.jsonl with the model's tokenizer into {data}", flush=True)
        prepare([Path(args.corpus) / "train.jsonl"], data, tokenizer=model / "tokenizer.json", val_fraction=0.01,
                seed=0)
    rows = {"start": metrics(model, Path(args.corpus) / "heldout.jsonl", args.eval_tokens)}
    for distill in (0.0, args.distill):
        run = out / f"distill-{distill:g}"
        run.mkdir(parents=True, exist_ok=True)
        (run / "job.toml").write_text(job(model.resolve(), data.resolve(), (run / "export").resolve(), args.steps,
                                          distill, args.own_heads))
        print(f"ee-tune, distill {distill:g}: {args.steps} steps ...", flush=True)
        launch(1, run / "job.toml", timeout=3600, extra_env={"OMP_NUM_THREADS": "2"})
        rows[f"ee-tune, distill {distill:g}"] = metrics(run / "export", Path(args.corpus) / "heldout.jsonl",
                                                        args.eval_tokens)
    heads = sorted(next(iter(rows.values())))
    what = "own exit projections" if args.own_heads else "exit heads as the model has them"
    print(f"\n{args.eval_tokens} held-out tokens; EE-tuning {args.steps} steps x 8 x 256 tokens, {what}\n")
    print("| model | " + " | ".join(f"exit {h} agreement / top-1" for h in heads[:-1]) + " | final top-1 |")
    print("|---|" + "---|" * len(heads))
    for name, m in rows.items():
        cells = [f"{m[h]['agreement_with_final']:.1%} / {m[h]['accuracy']:.1%}" for h in heads[:-1]]
        print(f"| {name} | " + " | ".join(cells) + f" | {m[heads[-1]]['accuracy']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
