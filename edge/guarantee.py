"""Thresholds with a finite-sample guarantee (Learn-then-Test): the stated agreement holds with stated confidence.

For one exit, candidate thresholds are tested from the strictest to the loosest (fixed-sequence testing, which
needs no multiplicity correction along the sequence): at each, the null hypothesis "the accepted positions disagree
with the full model at a rate above alpha" is rejected when the Clopper-Pearson upper confidence bound on that
rate, at level 1 - delta, is at most alpha. The loosest threshold reached before the first failure is chosen. So
with probability at least 1 - delta over the calibration sample, the chosen threshold's true disagreement rate is
at most alpha. Several exits split delta between them (Bonferroni); since each accepted set then meets alpha, so
does their union.
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
                  min_support: int = 20, grid: int = 200) -> tuple[float | None, dict]:
    """The loosest threshold on `score` (higher = more confident) whose accepted positions provably disagree at a
    rate of at most alpha (confidence 1 - delta), by fixed-sequence testing over `grid` candidate thresholds from
    the strictest down. Returns (threshold or None, details)."""
    order = torch.argsort(score, descending=True)
    s, wrong = score[order], (~agree[order]).long().cumsum(0)
    n = s.numel()
    if n < min_support:
        return None, {"tested": 0, "alpha": alpha, "delta": delta, "reason": f"only {n} positions"}
    sizes = sorted({int(k) for k in torch.linspace(min_support, n, grid).round().long().tolist() if k >= min_support})
    best, detail = None, {"tested": 0, "alpha": alpha, "delta": delta}
    for k in sizes:
        # ties: a threshold accepts every position scoring at least s[k-1]
        k_eff = int((s >= s[k - 1]).sum())
        m = int(wrong[k_eff - 1])
        ucb = clopper_pearson_upper(m, k_eff, delta)
        detail["tested"] += 1
        if ucb > alpha:
            break
        best = float(s[k - 1])
        detail.update(accepted=k_eff, disagreements=m, upper_bound=ucb)
    return best, detail
