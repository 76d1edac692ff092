"""Thresholds with a finite-sample guarantee (Learn-then-Test): the stated agreement holds with stated confidence.

For one exit, K candidate thresholds (the scores at a geometric grid of accepted-set sizes, fixed before looking
at agreement) are each tested at level delta / K (Bonferroni): the null hypothesis "the accepted positions disagree
with the full model at a rate above alpha" is rejected when the Clopper-Pearson upper confidence bound on that rate
is at most alpha. The loosest rejected candidate is chosen. With probability at least 1 - delta over the
calibration sample, no candidate with a true rate above alpha is rejected, so the chosen threshold's true
disagreement rate is at most alpha. (Bonferroni rather than fixed-sequence testing: one unlucky miss among the
most confident positions would end a fixed sequence at once.) Several exits split delta between them; since each
accepted set then meets alpha, so does their union.
"""

from __future__ import annotations

import math

import torch


def binom_cdf(m: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= m)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if m >= n else 0.0
    i = torch.arange(m + 1, dtype=torch.float64)
    logpmf = (math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1) + i * math.log(p)
              + (n - i) * math.log1p(-p))
    return float(torch.exp(logpmf).sum().clamp(max=1.0))


def clopper_pearson_upper(m: int, n: int, delta: float) -> float:
    """The exact one-sided upper confidence bound on a rate, after m events in n trials, at level 1 - delta."""
    if n == 0:
        return 1.0
    if m >= n:
        return 1.0
    lo, hi = m / n, 1.0
    for _ in range(60):  # bisection: the CDF decreases in p
        mid = (lo + hi) / 2
        if binom_cdf(m, n, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def ltt_threshold(score: torch.Tensor, agree: torch.Tensor, alpha: float, delta: float,
                  min_support: int = 20, grid: int = 30) -> tuple[float | None, dict]:
    """The loosest threshold on `score` (higher = more confident) whose accepted positions provably disagree at a
    rate of at most alpha (confidence 1 - delta), among `grid` candidates. Returns (threshold or None, details)."""
    order = torch.argsort(score, descending=True)
    s, wrong = score[order], (~agree[order]).long().cumsum(0)
    n = s.numel()
    level = delta / grid
    # candidates start where a bound could pass at all: zero disagreements in k positions bound the rate by
    # 1 - level^(1/k); the grid depends on n, alpha and delta only, not on the agreement data
    k_min = max(min_support, math.ceil(math.log(level) / math.log1p(-alpha)))
    detail = {"tested": 0, "alpha": alpha, "delta": delta, "candidates": grid}
    if n < k_min:
        return None, {**detail, "reason": f"{n} positions; at least {k_min} are needed for this bound"}
    sizes = sorted({int(round(k)) for k in torch.logspace(math.log10(k_min), math.log10(n), grid).tolist()})
    best = None
    for k in sizes:
        k_eff = int((s >= s[k - 1]).sum())  # ties: a threshold accepts every position scoring at least s[k-1]
        m = int(wrong[k_eff - 1])
        detail["tested"] += 1
        # the Clopper-Pearson bound is at most alpha exactly when P(Binomial(k, alpha) <= m) <= level
        if binom_cdf(m, k_eff, alpha) <= level:
            best = float(s[k - 1])
            detail.update(accepted=k_eff, disagreements=m)
    if best is not None:
        detail["upper_bound"] = clopper_pearson_upper(detail["disagreements"], detail["accepted"], level)
    return best, detail
