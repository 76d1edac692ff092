"""bench/report.py's teacher-forced scoring (acc, ppl) of a policy: every policy the edge ships scores, the learned
gate included (its features read each exit's hidden state, which the scoring now hands it; the report used to skip
that row, nan)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import coexit
from bench.report import perplexity
from edge.policy.calibrate import load_policy
from edge.policy.gate import GatePolicy

MODEL = Path(__file__).resolve().parents[1] / "models" / "coexit-code-small"
TEXT = ["import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n"
        "        return [line.rstrip() for line in f]\n" * 6]


@pytest.fixture(scope="module")
def model():
    return coexit.load(MODEL)


def test_shipped_gate_scores(model):
    shipped = load_policy(MODEL)
    assert isinstance(shipped, GatePolicy) and shipped.thresholds
    ppl, acc = perplexity(model, TEXT, shipped, None, 256)
    assert math.isfinite(ppl) and ppl > 1 and 0 < acc <= 1


def test_gate_that_always_exits_scores_as_that_exit(model):
    """A gate told to take its first exit always (threshold -inf) scores exactly as that exit's head alone, and one
    with no thresholds exactly as the final head: the gate's choices, not something else, pick the head."""
    shipped = load_policy(MODEL)
    first = min(shipped.gates)
    always = GatePolicy({first: -math.inf}, gates=shipped.gates)
    never = GatePolicy({}, gates=shipped.gates)
    assert perplexity(model, TEXT, always, None, 256) == perplexity(model, TEXT, None, first, 256)
    assert perplexity(model, TEXT, never, None, 256) == perplexity(model, TEXT, None, None, 256)
