"""Per-head quality on held-out token ids: next-token top-1 accuracy, perplexity and agreement with the final
head, for every exit and the final head (teacher forcing, non-overlapping windows)."""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from coexit.model import EarlyExitLM


@torch.no_grad()
def head_metrics(model: EarlyExitLM, ids: list[int], seq_len: int = 256,
                 progress: bool = False) -> dict[int, dict[str, float]]:
    L = model.config.num_hidden_layers
    heads = [*model.config.exit_layers, L]
    nll = {h: 0.0 for h in heads}
    hits = {h: 0 for h in heads}
    agree = {h: 0 for h in heads}
    count = 0
    for a in tqdm(range(0, len(ids) - 1, seq_len), desc="evaluating", unit="window", disable=not progress):
        x = torch.tensor([ids[a:a + seq_len + 1]])
        if x.shape[1] < 2:
            break
        out = model(x[:, :-1], exits="all")
        target = x[0, 1:]
        final = out.logits[0].argmax(-1)
        for h in heads:
            logits = (out.logits if h == L else out.exit_logits[h])[0].float()
            nll[h] += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            pred = logits.argmax(-1)
            hits[h] += int((pred == target).sum())
            agree[h] += int((pred == final).sum())
        count += target.numel()
    return {h: {"accuracy": hits[h] / count, "perplexity": math.exp(nll[h] / count),
                "agreement_with_final": agree[h] / count} for h in heads}
