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

from coexit.errors import UsageError

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

    def describe(self) -> str:
        """What this policy does, in words (the demo and `coexit generate` print it)."""
        if not self.thresholds:
            return "no edge exit (every token goes to the cloud)"
        op = "<=" if self.criterion == "entropy" else ">="
        return f"fixed {self.criterion} thresholds: " + ", ".join(
            f"exit {e} when {self.criterion} {op} {t:.3g}" for e, t in sorted(self.thresholds.items()))

    def observe(self, round_trip_s: float, compute_s: float, queue_s: float, bytes_up: int) -> None:
        """A fallback's measurements (a fixed policy ignores them; edge.policy.adaptive.AdaptivePolicy does not)."""

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


def check_thresholds(thresholds: dict[int, float], exits: list[int], criterion: str = "max_prob") -> None:
    """Refuse thresholds a policy would silently ignore or that cannot mean anything: a layer that is not one of
    `exits` (the edge's exits, named in the message) or a probability-like threshold outside [0, 1]."""
    bad = sorted(set(thresholds) - set(exits))
    if bad:
        raise UsageError(f"no edge exit at layer{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}: this "
                         f"model's edge exits are {', '.join(map(str, exits))}")
    for e, t in thresholds.items():
        if t == -math.inf:
            continue
        if criterion == "entropy" and not (t >= 0 and math.isfinite(t)):
            raise UsageError(f"the entropy threshold at exit {e} must be a finite number >= 0, got {t}")
        if criterion != "entropy" and not 0 <= t <= 1:
            raise UsageError(f"the {criterion} threshold at exit {e} must be within [0, 1], got {t}")


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


class AlsoAt:
    """`policy` with one more exit that always stops: lossless mode drafts from the split exit when nothing below it
    is confident. It wraps any policy (fixed, the learned gate, the adaptive one) instead of rebuilding it, so the
    wrapped policy still decides every other exit, keeps its own state (the gate remembers the earlier exits of a
    row), and still receives the client's measurements (the adaptive policy moves its thresholds)."""

    def __init__(self, policy: ExitPolicy, layer: int) -> None:
        self.policy, self.layer = policy, layer

    def __getattr__(self, name: str):  # observe*, speculate, criterion, ...: the wrapped policy's
        return getattr(self.policy, name)

    @property
    def thresholds(self) -> dict[int, float]:
        return {**self.policy.thresholds, self.layer: -math.inf}

    def checks(self, exit_layer: int) -> bool:
        return exit_layer == self.layer or self.policy.checks(exit_layer)

    def may_stop(self) -> set[int]:
        return self.policy.may_stop() | {self.layer}

    def decide(self, exit_layer: int, logits: Tensor, hidden: Tensor | None = None) -> bool:
        stop = self.policy.decide(exit_layer, logits, hidden)  # always asked: a stateful policy sees every exit
        return stop or exit_layer == self.layer
