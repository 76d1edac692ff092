"""`coexit evaluate --model DIR --data HELDOUT`: per-exit held-out top-1 accuracy, perplexity and agreement with
the final head, printed as a markdown table (the model card's numbers)."""

from __future__ import annotations

import argparse

import torch

from coexit.checkpoint import load
from coexit.errors import UsageError
from coexit.evaluation import head_metrics
from coexit.textdata import read_documents


def main(argv: list[str]) -> int:
    from coexit.cli import HelpFormatter

    ap = argparse.ArgumentParser(prog="coexit evaluate", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--data", nargs="+", required=True, help="held-out .jsonl (field text), text files or directories")
    ap.add_argument("--max-tokens", type=int, default=100_000, help="held-out tokens to score at most")
    ap.add_argument("--seq-len", type=int, default=256, help="window length")
    args = ap.parse_args(argv)
    if args.max_tokens < 2 or args.seq_len < 1:
        raise UsageError("--max-tokens must be at least 2 and --seq-len at least 1")
    model = load(args.model, dtype=torch.float32)
    ids: list[int] = []
    for doc in read_documents(args.data):
        ids += model.tokenizer.encode(doc, add_bos=True)
        if len(ids) >= args.max_tokens:
            break
    ids = ids[: args.max_tokens]
    metrics = head_metrics(model, ids, args.seq_len, progress=True)
    L = model.config.num_hidden_layers
    print(f"{len(ids)} held-out tokens from {', '.join(args.data)}\n")
    print("| head | layers | top-1 accuracy | perplexity | agreement with final head |\n|---|---|---|---|---|")
    for h, m in metrics.items():
        name = "final" if h == L else f"exit {h}"
        print(f"| {name} | {h} | {m['accuracy']:.1%} | {m['perplexity']:.2f} | {m['agreement_with_final']:.1%} |")
    return 0
