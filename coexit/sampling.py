"""Token sampling shared by edge and cloud: greedy, temperature, top-k, top-p, seeded per position.

The random draw for a position depends only on (seed, position), so whichever side samples a position gets the
same token from the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingParams()


def _generator(seed: int, position: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + position * 7_919 + 0x9E3779B9) % (2**63 - 1))
    return g


def filtered_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Apply temperature, top-k and top-p to logits (V,); removed entries become -inf."""
    x = logits.float() / params.temperature
    if params.top_k and params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        cum = torch.softmax(sorted_x, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_x, dim=-1) >= params.top_p  # keep the smallest prefix reaching top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return x


def sample(logits: Tensor, params: SamplingParams = GREEDY, position: int = 0) -> tuple[int, float]:
    """Pick a token from logits (V,) and return (token id, its log-probability under the unfiltered model)."""
    return sample_batch(logits[None], [params], [position])[0]


def sample_batch(logits: Tensor, params: list[SamplingParams], positions: list[int]) -> list[tuple[int, float]]:
    """`sample` for a batch: logits (B, V), one SamplingParams and position per row; same tokens as row by row.

    Log-probabilities and the greedy rows' argmax are computed for the whole batch at once; sampled rows draw
    with their own (seed, position) generator."""
    logits = logits.detach().float().cpu()
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = torch.argmax(logits, dim=-1).tolist()
    for i, p in enumerate(params):
        if not p.greedy:
            probs = torch.softmax(filtered_logits(logits[i], p), dim=-1)
            tokens[i] = int(torch.multinomial(probs, 1, generator=_generator(p.seed, positions[i])))
    picked = logprobs.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()
    return list(zip(tokens, picked))


def top_logprobs(logits: Tensor, k: int) -> list[tuple[int, float]]:
    lp = torch.log_softmax(logits.float(), dim=-1)
    vals, ids = torch.topk(lp, min(k, lp.numel()))
    return [(int(i), float(v)) for i, v in zip(ids, vals)]
