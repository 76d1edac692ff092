"""Exit criteria and the per-exit threshold policy, shared by the edge and the cloud's optional exits.

Criteria on an exit head's logits: `max_prob` (top-1 probability), `margin` (top-1 minus top-2 probability) and
`entropy` (stop when the entropy is at most the threshold). A policy holds one threshold per exit layer and checks
exits in order; the first confident exit wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

CRITERIA = ("max_prob", "margin", "entropy")


def confidence(logits: Tensor, criterion: str) -> float:
    """Score of logits (V,) under a criterion; for entropy, lower means more confident."""
    p = torch.softmax(logits.float(), dim=-1)
    if criterion == "max_prob":
        return float(p.max())
    if criterion == "margin":
        top2 = torch.topk(p, 2).values
        return float(top2[0] - top2[1])
    if criterion == "entropy":
        return float(-(p * torch.log(p.clamp_min(1e-30))).sum())
    raise ValueError(f"unknown exit criterion {criterion!r}; use one of {CRITERIA}")


@dataclass
class ExitPolicy:
    """thresholds: exit layer -> threshold. An exit absent from the map is never taken."""

    thresholds: dict[int, float] = field(default_factory=dict)
    criterion: str = "max_prob"

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(f"unknown exit criterion {self.criterion!r}; use one of {CRITERIA}")

    @classmethod
    def never(cls) -> ExitPolicy:
        return cls({})

    @classmethod
    def always(cls, exit_layer: int) -> ExitPolicy:
        return cls({exit_layer: -math.inf})

    @classmethod
    def uniform(cls, exit_layers, threshold: float, criterion: str = "max_prob") -> ExitPolicy:
        return cls({int(e): threshold for e in exit_layers}, criterion)

    def observe(self, round_trip_s: float, compute_s: float, queue_s: float, bytes_up: int) -> None:
        """A fallback's measurements (a fixed policy ignores them; edge.adaptive.AdaptivePolicy does not)."""

    def observe_edge(self, step_s: float, full: bool) -> None:
        """An edge step's time; full: it ran every edge layer."""

    def observe_verdict(self, accepted: bool) -> None:
        """The cloud's verdict on a draft made through a fallback (speculative collaborative mode)."""

    def may_stop(self) -> set[int]:
        """The exits where decide() can ever say stop (a policy that moves its thresholds: at any setting)."""
        return set(self.thresholds)

    def checks(self, exit_layer: int) -> bool:
        """Whether decide() looks at this exit. A backend applies no head at an exit its policy does not check
        (the logits are still there if read, e.g. the split exit's in standalone mode)."""
        return exit_layer in self.thresholds

    def decide(self, exit_layer: int, logits: Tensor, hidden: Tensor | None = None) -> bool:
        """Stop at this exit? logits (V,) and hidden (C,) of the newest row (a criterion may use either)."""
        t = self.thresholds.get(exit_layer)
        if t is None:
            return False
        if t == -math.inf:
            return True
        score = confidence(logits, self.criterion)
        return score <= t if self.criterion == "entropy" else score >= t


class Below:
    """`policy` as a run that must emit at `limit` sees it (standalone mode: the split exit emits whatever a
    decide() there would say). Only exits below `limit` can stop a row, so an exit is checked only when it, or a
    later exit below `limit` whose decision reads it (the learned gate reads earlier exits), has a threshold.
    With no threshold below `limit` nothing is checked, and a backend runs straight to `limit`."""

    def __init__(self, policy: ExitPolicy, limit: int) -> None:
        self.policy, self.limit = policy, limit

    def checks(self, exit_layer: int) -> bool:
        return exit_layer < self.limit and self.policy.checks(exit_layer) and \
            any(exit_layer <= t < self.limit for t in self.policy.thresholds)

    def may_stop(self) -> set[int]:
        return {e for e in self.policy.may_stop() if e < self.limit}

    def decide(self, exit_layer: int, logits: Tensor, hidden: Tensor | None = None) -> bool:
        return exit_layer < self.limit and self.policy.decide(exit_layer, logits, hidden)
