"""The network-aware exit policy (`policy="adaptive"`, `--quality-budget`): thresholds that spend a fixed quality
budget where it buys the most latency.

Calibration (`coexit calibrate`) records a frontier of per-exit threshold vectors: for each, the share of
calibration positions each exit takes and the overall disagreement with the full model (exited positions whose
token differs, over all positions). Only points whose disagreement is within the quality budget are ever used, so
the policy cannot exceed the budget on the calibration data, whatever the network does.

Among those points it picks by expected latency per token,
    T = sum_e share_e * c_e + (1 - share) * (c_split + F),
with c_e the edge's compute to reach exit e and F the expected cost of a fallback: round-trip time + the cloud's
queueing delay + its compute + the upload at the measured bandwidth. It takes the point with the least
disagreement among those within 5% (at least 0.2 ms) of the fastest: when fallbacks are expensive that is the
loosest point the budget allows, when they are cheap a stricter one. The client feeds it measurements after every
fallback (`observe`) and every edge step (`observe_edge`); it re-picks then.

And once a fallback costs more than an edge step (`speculate`), collaborative mode stops waiting for fallbacks: it
drafts the token from the split exit and lets the cloud verify it (edge/lossless.py, speculative), so a fallback
no longer costs a round trip, and the tokens are still the ones collaborative mode would make.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import torch

from coexit.exits import ExitPolicy


@dataclass(frozen=True)
class FrontierPoint:
    thresholds: dict[int, float]  # exit layer -> threshold (exits absent: never taken)
    shares: dict[int, float]  # exit layer -> share of positions it takes
    disagreement: float  # taken positions whose exit token differs from the final head's, over all positions

    @property
    def share(self) -> float:
        return sum(self.shares.values())

    def to_dict(self) -> dict:
        return {"thresholds": {str(k): v for k, v in self.thresholds.items()},
                "shares": {str(k): v for k, v in self.shares.items()}, "disagreement": self.disagreement}

    @classmethod
    def from_dict(cls, d: dict) -> FrontierPoint:
        return cls({int(k): float(v) for k, v in d["thresholds"].items()},
                   {int(k): float(v) for k, v in d["shares"].items()}, float(d["disagreement"]))


def evaluate(conf: dict[int, torch.Tensor], agree: dict[int, torch.Tensor], exits: list[int],
             thresholds: dict[int, float], higher_is_confident: bool = True) -> FrontierPoint:
    """Shares and disagreement of a threshold vector on calibration statistics (exits checked in order)."""
    n = next(iter(conf.values())).numel()
    free = torch.ones(n, dtype=torch.bool)
    shares, wrong = {}, 0
    for e in exits:
        if e not in thresholds:
            continue
        c = conf[e]
        take = free & ((c >= thresholds[e]) if higher_is_confident else (c <= thresholds[e]))
        shares[e] = float(take.float().mean())
        wrong += int((take & ~agree[e]).sum())
        free &= ~take
    return FrontierPoint(dict(thresholds), shares, wrong / max(1, n))


def frontier(conf: dict[int, torch.Tensor], agree: dict[int, torch.Tensor], exits: list[int],
             higher_is_confident: bool = True, levels: int = 28,
             include: dict[int, float] | None = None) -> list[FrontierPoint]:
    """The Pareto frontier (lowest disagreement for each share) over a grid of per-exit thresholds: `levels`
    quantiles of each exit's confidence, spaced geometrically towards the most confident end (where small budgets
    live: from the top 50% of positions down to the top 0.05%), the thresholds in `include` (the fixed calibrated
    policy, so that it is always on the grid), and "never"."""
    tail = torch.logspace(torch.log10(torch.tensor(0.5)), torch.log10(torch.tensor(0.0005)), levels)
    grids = []
    for e in exits:
        c = conf[e].float()
        qs = 1 - tail if higher_is_confident else tail
        values = {float(v) for v in torch.quantile(c, qs)}
        if include and e in include:
            values.add(float(include[e]))
        grids.append([None, *sorted(values)])
    points = []
    for combo in itertools.product(*grids):
        thr = {e: t for e, t in zip(exits, combo) if t is not None}
        points.append(evaluate(conf, agree, exits, thr, higher_is_confident))
    points.sort(key=lambda p: (p.disagreement, -p.share))
    best, out = -1.0, []
    for p in points:  # keep a point only if it takes more than every point with less disagreement
        if p.share > best + 1e-9:
            out.append(p)
            best = p.share
    return out


@dataclass
class NetworkEstimate:
    """Exponentially weighted estimates from the client's own measurements (seconds, bytes/s)."""

    rtt_s: float | None = None  # network round trip without upload time, queueing or compute
    bandwidth: float | None = None  # upload bytes per second
    queue_s: float = 0.0
    compute_s: float = 0.0
    upload_bytes: float = 0.0  # per fallback
    edge_step_s: float = 0.002  # an edge step through every edge layer
    acceptance: float | None = None  # of drafts made through fallbacks (speculative collaborative mode)
    alpha: float = 0.3

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def observe(self, round_trip_s: float, compute_s: float, queue_s: float, bytes_up: int) -> None:
        net = max(0.0, round_trip_s - compute_s - queue_s)
        self.queue_s = self._ewma(self.queue_s, queue_s)
        self.compute_s = self._ewma(self.compute_s, compute_s)
        self.upload_bytes = self._ewma(self.upload_bytes, float(bytes_up))
        if bytes_up <= 4096 or self.rtt_s is None:  # small uploads measure the round trip itself
            self.rtt_s = self._ewma(self.rtt_s, net)
        elif net > self.rtt_s:  # large ones, the bandwidth beyond it
            self.bandwidth = self._ewma(self.bandwidth, bytes_up / (net - self.rtt_s))

    @property
    def fallback_s(self) -> float:
        """Expected cost of the next fallback beyond the edge's own compute."""
        upload = self.upload_bytes / self.bandwidth if self.bandwidth else 0.0
        return (self.rtt_s or 0.0) + self.queue_s + self.compute_s + upload


@dataclass
class AdaptivePolicy(ExitPolicy):
    """An ExitPolicy whose thresholds follow the network (see the module docstring)."""

    points: list[FrontierPoint] = field(default_factory=list)
    budget: float = 0.0
    split: int = 0
    net: NetworkEstimate = field(default_factory=NetworkEstimate)

    def __post_init__(self) -> None:
        super().__post_init__()
        # one policy may serve concurrent requests (`coexit edge-serve`): the link is theirs to share, and each
        # measurement updates the estimate and re-picks the thresholds as one step
        self._lock = threading.RLock()
        self.admissible = [p for p in self.points if p.disagreement <= self.budget]
        if not self.admissible:
            raise ValueError(f"no calibrated threshold setting stays within the quality budget {self.budget}; "
                             f"the strictest disagrees on {min(p.disagreement for p in self.points):.4f}")
        self.repick()

    def describe(self) -> str:
        now = ", ".join(f"exit {e} at {self.criterion} >= {t:.3g}" for e, t in sorted(self.thresholds.items()))
        return (f"network-aware max-prob thresholds within a {self.budget:.2%} disagreement budget, re-picked from "
                f"{len(self.admissible)} calibrated settings as the link is measured (now: {now or 'no exit'})")

    def latency(self, p: FrontierPoint) -> float:
        c = self.net.edge_step_s
        edge = sum(s * c * e / self.split for e, s in p.shares.items())
        fallback = self.net.fallback_s
        if self.speculate() and self.net.acceptance is not None:  # only a rejected draft waits for the cloud
            fallback *= 1 - self.net.acceptance
        return edge + (1 - p.share) * (c + fallback)

    def choose(self) -> FrontierPoint:
        costs = [self.latency(p) for p in self.admissible]
        best = min(costs)
        slack = max(0.05 * best, 0.0002)
        return min((p for p, t in zip(self.admissible, costs) if t <= best + slack), key=lambda p: p.disagreement)

    def may_stop(self) -> set[int]:
        return {e for p in self.admissible for e in p.thresholds}

    def repick(self) -> None:
        with self._lock:
            self.current = self.choose()
            self.thresholds = dict(self.current.thresholds)

    def observe(self, round_trip_s: float, compute_s: float, queue_s: float, bytes_up: int) -> None:
        with self._lock:
            self.net.observe(round_trip_s, compute_s, queue_s, bytes_up)
            self.repick()

    def speculate(self) -> bool:
        """Draft through a fallback instead of waiting for it (speculative collaborative mode): worth it once a
        fallback costs more than an edge step, which is all a rejected draft wastes on the edge."""
        return self.net.rtt_s is not None and self.net.fallback_s > self.net.edge_step_s

    def observe_verdict(self, accepted: bool) -> None:
        with self._lock:
            self.net.acceptance = self.net._ewma(self.net.acceptance, float(accepted))

    def observe_edge(self, step_s: float, full: bool) -> None:
        if full:  # a step through every edge layer
            with self._lock:
                self.net.edge_step_s = self.net._ewma(self.net.edge_step_s, step_s)
