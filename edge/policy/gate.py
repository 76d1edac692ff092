"""The learned exit gate (`coexit calibrate --criterion learned`), in the spirit of JEI-DNN and PALBERT: per exit, a
logistic model on cheap features of that exit predicts "this exit's token equals the final head's".

Features of the newest row at exit e: its top-4 probabilities, the entropy, whether its top-1 equals the previous
exit's (0 at the first exit), and the relative norm of the hidden state's change since the previous exit (0 at
the first). The gate's score is the predicted probability of agreement; thresholds on it are chosen like any
other criterion. The gate is stored as DIR/exit_gate.json beside exit_policy.json, and `load_policy` builds a
`GatePolicy` from both, so EdgeClient.from_checkpoint uses it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from coexit.exits import ExitPolicy

GATE_FILE = "exit_gate.json"
FEATURES = ("p1", "p2", "p3", "p4", "entropy", "agrees_with_previous_exit", "hidden_change")


def features(logits: Tensor, hidden: Tensor | None, prev_top: Tensor | None, prev_hidden: Tensor | None) -> Tensor:
    """Features (N, F) from an exit's logits (N, V) and hidden states (N, C), and the previous exit's top-1 (N,)
    and hidden states (N, C) (None at the first exit)."""
    p = torch.softmax(logits.float(), dim=-1)
    top = torch.topk(p, 4, dim=-1).values
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1, keepdim=True)
    n = logits.shape[0]
    if prev_top is None or hidden is None or prev_hidden is None:
        same = torch.zeros(n, 1)
        change = torch.zeros(n, 1)
    else:
        same = (logits.argmax(-1) == prev_top).float()[:, None]
        h, hp = hidden.float(), prev_hidden.float()
        change = ((h - hp).norm(dim=-1) / hp.norm(dim=-1).clamp_min(1e-6))[:, None]
    return torch.cat([top, entropy, same, change], dim=-1)


@dataclass
class ExitGate:
    """Logistic regression on standardised features."""

    weight: list[float]
    bias: float
    mean: list[float]
    std: list[float]

    def score(self, x: Tensor) -> Tensor:
        z = (x.float() - torch.tensor(self.mean)) / torch.tensor(self.std)
        return torch.sigmoid(z @ torch.tensor(self.weight) + self.bias)

    @classmethod
    def fit(cls, x: Tensor, y: Tensor, l2: float = 1e-3, steps: int = 200) -> ExitGate:
        x, y = x.float(), y.float()
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - mean) / std
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return cls(w.detach().tolist(), float(b.detach()), mean.tolist(), std.tolist())


def save_gates(model_dir: str | Path, gates: dict[int, ExitGate]) -> Path:
    path = Path(model_dir) / GATE_FILE
    path.write_text(json.dumps({"features": list(FEATURES), "exits": {str(e): g.__dict__ for e, g in gates.items()}},
                               indent=2) + "\n")
    return path


def load_gates(model_dir: str | Path) -> dict[int, ExitGate]:
    path = Path(model_dir) / GATE_FILE
    d = json.loads(path.read_text())
    if tuple(d.get("features", ())) != FEATURES:
        raise ValueError(f"{path} was trained on features {d.get('features')}, this version computes {FEATURES}; "
                         f"re-run `coexit calibrate --criterion learned`")
    return {int(e): ExitGate(**g) for e, g in d["exits"].items()}


@dataclass
class GatePolicy(ExitPolicy):
    """Exit when the gate's predicted agreement is at least the exit's threshold. Exits are checked in order
    for the newest row; the gate remembers the previous exit's top-1 and hidden state within that row."""

    gates: dict[int, ExitGate] = field(default_factory=dict)

    def __post_init__(self) -> None:  # no criterion check: the gate is the criterion ("learned")
        self._prev: tuple[Tensor, Tensor | None] | None = None
        self._first = min(self.gates, default=0)

    def describe(self) -> str:
        if not self.thresholds:
            return "learned exit gate, with no exit taken"
        return "learned exit gate (exit_gate.json): " + ", ".join(
            f"exit {e} when its predicted agreement with the full model >= {t:.3g}"
            for e, t in sorted(self.thresholds.items()))

    def checks(self, exit_layer: int) -> bool:
        return exit_layer in self.gates or exit_layer in self.thresholds  # later gates read earlier exits' tops

    def decide(self, exit_layer: int, logits: Tensor, hidden: Tensor | None = None) -> bool:
        if exit_layer == self._first:
            self._prev = None
        t = self.thresholds.get(exit_layer)
        gate = self.gates.get(exit_layer)
        prev_top, prev_hidden = self._prev if self._prev is not None else (None, None)
        h = hidden[None] if hidden is not None else None
        x = features(logits[None], h, prev_top, prev_hidden)
        self._prev = (logits.argmax()[None], h)
        if t is None or gate is None:
            return False
        if t == -math.inf:
            return True
        return float(gate.score(x)[0]) >= t
