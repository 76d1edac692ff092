"""Exit voting (Edge-LLM's inference-time voting): the token is chosen from a combination of every edge exit's
distribution rather than from one exit's. Rules: "max" (Edge-LLM's: the element-wise maximum of the exits'
probabilities, renormalised), "mean", and "weighted" (each exit weighted by its own top-1 probability).

As a policy it decides at the split exit, where every edge exit of the row has been seen: stop when the combined
distribution's top-1 probability is at least the threshold; `emit_logits` gives the run the combined distribution
(as log-probabilities) to sample from. Exits below the split are only looked at (their heads run), never taken.
`combine` is the rule itself, for the benchmark (bench/adapt.py) and tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from coexit.exits import ExitPolicy

RULES = ("max", "mean", "weighted")


def combine(probs: list[Tensor], rule: str) -> Tensor:
    """Probabilities (..., V) of each exit -> the combined distribution (..., V)."""
    p = torch.stack(probs)  # (E, ..., V)
    if rule == "max":
        out = p.max(0).values
    elif rule == "mean":
        out = p.mean(0)
    elif rule == "weighted":
        w = p.max(-1, keepdim=True).values
        out = (p * w).sum(0) / w.sum(0)
    else:
        raise ValueError(f"unknown voting rule {rule!r}; use one of {RULES}")
    return out / out.sum(-1, keepdim=True)


@dataclass
class VotingPolicy(ExitPolicy):
    """thresholds: {split: t} (the only exit that can stop); exits: the edge exits whose votes count."""

    exits: tuple[int, ...] = ()
    rule: str = "max"
    _probs: dict[int, Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:  # the criterion is the vote
        if self.rule not in RULES:
            raise ValueError(f"unknown voting rule {self.rule!r}; use one of {RULES}")

    def describe(self) -> str:
        return f"exit voting ({self.rule} rule over exits {list(self.exits)}): " + ", ".join(
            f"exit {e} when the vote's top-1 probability >= {t:.3g}" for e, t in sorted(self.thresholds.items()))

    def checks(self, exit_layer: int) -> bool:
        return exit_layer in self.exits or exit_layer in self.thresholds

    def decide(self, exit_layer: int, logits: Tensor, hidden: Tensor | None = None) -> bool:
        if exit_layer == min(self.exits, default=exit_layer):
            self._probs = {}
        if exit_layer in self.exits:
            self._probs[exit_layer] = torch.softmax(logits.float(), -1)
        t = self.thresholds.get(exit_layer)
        if t is None:
            return False
        return float(self._voted().max()) >= t

    def _voted(self) -> Tensor:
        return combine([self._probs[e] for e in sorted(self._probs)], self.rule)

    def emit_logits(self, exit_logits, layer: int) -> Tensor:
        """What the run samples when this policy stopped the row at `layer`: the vote, as log-probabilities."""
        if not self._probs or layer not in self.thresholds:
            return exit_logits[layer]
        return torch.log(self._voted().clamp_min(1e-30))
