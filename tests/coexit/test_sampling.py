"""Sampling: greedy is argmax, seeded draws are reproducible per (seed, position), top-k/top-p restrict support."""

from __future__ import annotations

import pytest
import torch

from coexit.sampling import SamplingParams, filtered_logits, sample


def test_greedy_is_argmax_with_logprob():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    token, lp = sample(logits)
    assert token == 1
    assert lp == pytest.approx(float(torch.log_softmax(logits, -1)[1]))


def test_seeded_sampling_is_reproducible_and_position_dependent():
    logits = torch.zeros(1000)
    p = SamplingParams(temperature=1.0, seed=7)
    draws = [sample(logits, p, position=i)[0] for i in range(20)]
    assert draws == [sample(logits, p, position=i)[0] for i in range(20)]
    assert len(set(draws)) > 10
    assert draws != [sample(logits, SamplingParams(temperature=1.0, seed=8), position=i)[0] for i in range(20)]


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    assert torch.isfinite(filtered_logits(logits, SamplingParams(temperature=1.0, top_k=2))).tolist() == [
        True, True, False, False, False]
    probs = torch.softmax(logits, -1)  # [0.636, 0.234, 0.086, ...]
    assert probs[0] < 0.8 < probs[0] + probs[1]
    kept = torch.isfinite(filtered_logits(logits, SamplingParams(temperature=1.0, top_p=0.8)))
    assert kept.tolist() == [True, True, False, False, False]
    for pos in range(50):
        assert sample(logits, SamplingParams(temperature=1.0, top_p=0.8, seed=1), pos)[0] in (0, 1)


def test_invalid_params_are_rejected():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, seed=3),
                                    SamplingParams(temperature=0.7, top_k=5, seed=4),
                                    SamplingParams(temperature=1.3, top_p=0.8, seed=5)])
def test_speculative_acceptance_keeps_the_target_distribution(params):
    """Draft from a sparse q, verify against p with the acceptance rule: the verified tokens follow p's sampling
    distribution (total variation within sampling noise), while the drafts alone do not."""
    from coexit.sampling import draft_distribution, filtered_logits, sample_draft, verify_draft

    g = torch.Generator().manual_seed(0)
    target, draft = torch.randn(10, generator=g) * 2, torch.randn(10, generator=g) * 2
    ids, probs = draft_distribution(draft, params)
    n = 20000
    counts, drafted = torch.zeros(10), torch.zeros(10)
    for pos in range(n):
        tok = sample_draft(ids, probs, SamplingParams(params.temperature, params.top_k, params.top_p, pos), pos)
        drafted[tok] += 1
        _, out, _ = verify_draft(target, SamplingParams(params.temperature, params.top_k, params.top_p, pos), pos,
                                 tok, ids, probs)
        counts[out] += 1
    p = torch.softmax(filtered_logits(target, params), -1)
    assert float((counts / n - p).abs().sum()) / 2 < 0.02
    assert float((drafted / n - p).abs().sum()) / 2 > 0.1
