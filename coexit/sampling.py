"""Token sampling shared by edge and cloud: greedy, temperature, top-k, top-p, seeded per position.

The random draw for a position depends only on (seed, position), so whichever side samples a position gets the
same token from the same logits.

Lossless mode adds drafting and verification: the edge draws a draft from a sparse draft distribution q (its
exit head's sampling distribution cut to its top entries) on a separate random stream, and the cloud applies the
speculative-sampling acceptance rule (accept with probability min(1, p(x)/q(x)), else draw from max(0, p - q)
renormalised), so the verified token is distributed exactly as the full model's p. With temperature 0 both reduce
to comparing argmaxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from coexit.errors import UsageError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingParams()


DRAFT_STREAM = 1  # the edge's draft draws: independent of the cloud's acceptance draws (stream 0)


def _generator(seed: int, position: int, stream: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + position * 7_919 + stream * 104_729 + 0x9E3779B9) % (2**63 - 1))
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
    tokens = logits.numpy().argmax(-1).tolist()  # torch.argmax's rule (the first maximum, NaN first), in numpy
    for i, p in enumerate(params):
        if not p.greedy:
            probs = torch.softmax(filtered_logits(logits[i], p), dim=-1)
            tokens[i] = int(torch.multinomial(probs, 1, generator=_generator(p.seed, positions[i])))
    picked = logprobs.numpy()[np.arange(len(tokens)), tokens].tolist()
    return list(zip(tokens, picked))


def top_logprobs(logits: Tensor, k: int) -> list[tuple[int, float]]:
    lp = torch.log_softmax(logits.float(), dim=-1)
    vals, ids = torch.topk(lp, min(k, lp.numel()))
    return [(int(i), float(v)) for i, v in zip(ids, vals)]


def draft_distribution(logits: Tensor, params: SamplingParams, max_support: int = 64,
                       mass: float = 0.9999) -> tuple[list[int], list[float]]:
    """The sparse draft distribution q for logits (V,): the sampling distribution's top entries up to `mass`
    (at most max_support), renormalised. Greedy: the argmax with probability 1."""
    if params.greedy:
        return [int(torch.argmax(logits))], [1.0]
    probs = torch.softmax(filtered_logits(logits, params), dim=-1)
    vals, ids = torch.topk(probs, min(max_support, probs.numel()))
    keep = int(torch.searchsorted(vals.cumsum(0), torch.tensor(mass * float(vals.sum())))) + 1
    vals, ids = vals[:keep], ids[:keep]
    vals = vals[vals > 0]
    ids = ids[: vals.numel()]
    return ids.tolist(), (vals / vals.sum()).tolist()


def sample_draft(support_ids: list[int], support_probs: list[float], params: SamplingParams, position: int) -> int:
    """Draw the edge's draft for `position` from q, on the draft stream."""
    if params.greedy or len(support_ids) == 1:
        return support_ids[0]
    g = _generator(params.seed, position, DRAFT_STREAM)
    return support_ids[int(torch.multinomial(torch.tensor(support_probs), 1, generator=g))]


def check_draft(token: int, support_ids: list[int], support_probs: list[float], vocab_size: int,
                greedy: bool) -> None:
    """ValueError with a reason when a draft's distribution is unusable (the cloud's input check)."""
    if not 0 <= token < vocab_size:
        raise ValueError(f"draft token {token} is outside the vocabulary of {vocab_size}")
    if greedy:
        return
    if len(support_ids) != len(support_probs) or not support_ids:
        raise ValueError("a sampled draft needs support_ids and support_probs of equal, non-zero length")
    if len(set(support_ids)) != len(support_ids) or max(support_ids) >= vocab_size:
        raise ValueError("support_ids must be distinct token ids inside the vocabulary")
    q = torch.tensor(support_probs, dtype=torch.float64)
    if not bool(torch.isfinite(q).all()) or bool((q < 0).any()) or abs(float(q.sum()) - 1.0) > 1e-3:
        raise ValueError("support_probs must be finite, non-negative and sum to 1")
    if token not in support_ids or support_probs[support_ids.index(token)] <= 0:
        raise ValueError(f"draft token {token} has no probability in its support")


def verify_draft(logits: Tensor, params: SamplingParams, position: int, token: int, support_ids: list[int],
                 support_probs: list[float]) -> tuple[bool, int, float]:
    """The full model's verdict on a draft for `position` from its logits (V,): (accepted, token, logprob).

    Greedy: accepted iff the draft is the argmax, else the argmax. Sampling: the speculative-sampling rule with
    the cloud's own (seed, position) draws, so the returned token is distributed as the full model's p."""
    logits = logits.detach().float().cpu()
    logprobs = torch.log_softmax(logits, dim=-1)
    if params.greedy:
        best = int(torch.argmax(logits))
        return best == token, best, float(logprobs[best])
    p = torch.softmax(filtered_logits(logits, params), dim=-1).double()
    q = torch.zeros_like(p)
    q[torch.tensor(support_ids)] = torch.tensor(support_probs, dtype=torch.float64)
    g = _generator(params.seed, position)
    u = float(torch.rand(1, generator=g, dtype=torch.float64))
    if u * float(q[token]) < float(p[token]):  # u < p/q without dividing
        return True, token, float(logprobs[token])
    residual = (p - q).clamp_min(0)
    if float(residual.sum()) <= 0:  # only by rounding: p <= q everywhere means p == q
        residual = p
    pick = int(torch.multinomial(residual / residual.sum(), 1, generator=g))
    return False, pick, float(logprobs[pick])
