"""A compression policy for the edge: one llama.cpp type per edge matrix, chosen from measured sensitivity
(edge/export/sensitivity.py) so that the summed damage is least within a budget of bits per weight.

- Budget: bits per weight of the edge layers' matrices *as stored* (bench/quant_mix.py's "layer bpw"): the policy
  names stored types only (quant_types: a k-quant on a row that is not a multiple of 256 wide is already its
  fallback), so the bytes counted here are the file's. token_embd and output (the split exit's head) are outside
  the layer budget, as in every hand-made mix, and take `heads` (q8_0 by default).
- Choice: an exact multiple-choice knapsack by dynamic programming over the byte budget. With a few dozen tensors
  and at most eight types each the table is a few thousand states wide, so the exact optimum of the measured,
  additive damage costs milliseconds; a Lagrangian relaxation (llama.cpp's --target-bpw) reaches only points on
  the lower convex hull of the trade-off and can leave part of the budget unused, and a greedy upgrade order is
  not optimal either. Sizes are counted in units of their greatest common divisor (rounded up when that would
  make the table too wide), so a policy never exceeds its budget.
- File: JSON beside the model (POLICY_FILE), also written into every exported GGUF's metadata (META_KEY) by
  edge/export/gguf.py, which applies it as llama.cpp per-tensor type overrides (renumbered for segments).
- Backend: "gguf" (llama.cpp's types) or "bnb" (bitsandbytes' bnb-nf4 / bnb-int8, applied by edge/backends/bnb.py
  when it loads the model; its embeddings and heads stay fp32 there).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from coexit.errors import UsageError
from edge.export.quant_types import BNB, bits_per_weight, tensor_bytes

POLICY_FILE = "quant_policy.json"
FORMAT = "coexit.quant_policy/1"
META_KEY = "coexit.quant_policy"
HEADS = ("token_embd.weight", "output.weight")
MAX_STATES = 1 << 20
METHOD = "exact multiple-choice knapsack (dynamic programming over bytes) of measured per-tensor damage"


class BudgetError(UsageError):
    """A budget no choice of types meets."""


@dataclass
class Policy:
    fingerprint: str
    budget_bpw: float
    types: dict[str, str]  # blk.N.<kind>.weight -> stored ggml type
    shapes: dict[str, list[int]]  # blk.N.<kind>.weight -> [rows, cols] (torch orientation)
    heads: dict[str, str] = field(default_factory=lambda: dict.fromkeys(HEADS, "q8_0"))
    damage: float = 0.0  # predicted: the sum of the chosen types' measured damage
    imatrix: str | None = None  # the importance matrix (in the model directory) the damage was measured with
    method: str = METHOD
    sensitivity: dict = field(default_factory=dict)  # how the damage was measured
    backend: str = "gguf"  # "gguf" (llama.cpp types) or "bnb" (bitsandbytes types)

    @property
    def layer_bytes(self) -> int:
        return sum(tensor_bytes(t, *self.shapes[n]) for n, t in self.types.items())

    @property
    def layer_bpw(self) -> float:
        return 8 * self.layer_bytes / sum(r * c for r, c in self.shapes.values())

    def tensor_types(self, lo: int = 0, hi: int | None = None) -> dict[str, str]:
        """llama.cpp override regexes for the layers [lo, hi), renumbered from blk.0 (a segment's numbering)."""
        out = {}
        for name, t in self.types.items():
            _, i, rest = name.split(".", 2)
            if lo <= int(i) < (hi if hi is not None else 1 << 30):
                out[rf"^blk\.{int(i) - lo}\.{rest.replace('.', chr(92) + '.')}$"] = t
        return out

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.types.values():
            out[t] = out.get(t, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: bits_per_weight(kv[0])))

    def describe(self) -> str:
        return f"policy {self.budget_bpw:g} bpw ({self.layer_bpw:.2f} as stored)"

    def to_json(self) -> str:
        d = {"format": FORMAT, **asdict(self), "layer_bpw": round(self.layer_bpw, 4)}
        return json.dumps(d, indent=1, sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def from_json(cls, text: str, where: str = "policy") -> Policy:
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise ValueError(f"{where} is not a compression policy ({FORMAT}); write one with `coexit compress`")
        d.pop("format")
        d.pop("layer_bpw", None)
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        return cls.from_json(Path(path).read_text(), str(path))


def choose(sens, budget_bpw: float, heads: str = "q8_0", types: tuple[str, ...] | None = None,
           backend: str = "gguf") -> Policy:
    """The policy of least summed measured damage (Sensitivity.damage) whose edge layers store at most
    `budget_bpw` bits per weight; `types` restricts the stored types considered (default: all the backend's)."""
    if backend not in ("gguf", "bnb"):
        raise UsageError(f"unknown backend {backend!r} for a policy; choose gguf or bnb")
    if types is None:
        types = tuple({t for e in sens.tensors.values() for t in e["damage"] if (t in BNB) == (backend == "bnb")})
        if not types:
            raise UsageError(f"no {backend} types measured yet: run `coexit compress --backend {backend}` with --text")
    if backend == "bnb":
        heads = "f32"  # the bitsandbytes backend keeps its embeddings and heads in fp32
    names = sorted(sens.tensors, key=_order)
    shapes = {n: list(sens.tensors[n]["shape"]) for n in names}
    options = []
    for n in names:
        opts = [(t, tensor_bytes(t, *shapes[n]), sens.damage(n, t)) for t in sens.tensors[n]["damage"]
                if types is None or t in types]
        if not opts:
            raise BudgetError(f"none of the types {types} was measured for {n}")
        options.append(opts)
    weights = sum(r * c for r, c in shapes.values())
    cap = math.floor(budget_bpw * weights / 8)
    least = sum(min(b for _, b, _ in o) for o in options)
    if least > cap:
        raise BudgetError(f"--budget-bpw {budget_bpw:g} is below what the edge layers can be stored at: "
                          f"{8 * least / weights:.2f} bits per weight with every matrix at its cheapest type")
    unit = math.gcd(*[b for o in options for _, b, _ in o])
    unit = max(unit, -(-cap // MAX_STATES))
    width = cap // unit + 1
    dp = np.full(width, np.inf)
    dp[0] = 0.0
    picks = np.zeros((len(names), width), np.int8)
    for k, opts in enumerate(options):
        new = np.full(width, np.inf)
        for j, (_, b, d) in enumerate(opts):
            u = -(-b // unit)
            if u >= width:
                continue
            cand = np.full(width, np.inf)
            cand[u:] = dp[:width - u] + d
            better = cand < new
            new[better], picks[k][better] = cand[better], j
        dp = new
    c = int(np.argmin(dp))
    if not np.isfinite(dp[c]):
        raise BudgetError(f"--budget-bpw {budget_bpw:g}: no choice of types fits")
    chosen = {}
    for k in range(len(names) - 1, -1, -1):
        t, b, _ = options[k][picks[k][c]]
        chosen[names[k]] = t
        c -= -(-b // unit)
    chosen = {n: chosen[n] for n in names}
    damage = sum(sens.damage(n, t) for n, t in chosen.items())
    meta = {k: v for k, v in sens.meta.items() if k != "also"}
    if backend == "bnb":  # the measurement that holds the bitsandbytes types
        meta = next((m for m in sens.meta.get("also", []) if set(m.get("candidates", ())) & set(BNB)), meta)
    return Policy(sens.fingerprint, float(budget_bpw), chosen, shapes, dict.fromkeys(HEADS, heads),
                  round(damage, 9), sens.meta.get("imatrix") if backend == "gguf" else None, METHOD, meta, backend)


def _order(name: str):
    _, i, rest = name.split(".", 2)
    return int(i), rest
