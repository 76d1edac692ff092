"""Cached decoding: step-by-step (and chunked) decoding with the KV cache equals one full forward, at every
position and at every exit."""

from __future__ import annotations

import pytest
import torch

import coexit


@pytest.mark.parametrize("flavour", ["tiny", "tiny-mha", "tiny-llama3", "tiny-qwen2"])
def test_step_by_step_equals_full_forward(flavour, checkpoint_factory):
    model = coexit.load(checkpoint_factory(flavour))
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids, exits="all")
        cache = model.new_cache(batch_size=2)
        for t in range(ids.shape[1]):
            step = model(ids[:, t:t + 1], cache=cache, exits="all")
            torch.testing.assert_close(step.logits[:, 0], full.logits[:, t], atol=1e-4, rtol=0)
            assert set(step.exit_logits) == set(model.config.exit_layers)
            for e, lg in step.exit_logits.items():
                torch.testing.assert_close(lg[:, 0], full.exit_logits[e][:, t], atol=1e-4, rtol=0)
    assert cache.depth_lengths() == [40] * model.config.num_hidden_layers


def test_chunked_prefill_equals_full_forward(tiny_dir):
    model = coexit.load(tiny_dir)
    ids = torch.randint(0, model.config.vocab_size, (1, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, exits="all")
        cache = model.new_cache()
        pieces, bounds = [], [0, 5, 6, 19, 37]
        for a, b in zip(bounds, bounds[1:]):
            pieces.append(model(ids[:, a:b], cache=cache, exits="all"))
    torch.testing.assert_close(torch.cat([p.logits for p in pieces], 1), full.logits, atol=1e-4, rtol=0)
    for e in model.config.exit_layers:
        torch.testing.assert_close(torch.cat([p.exit_logits[e] for p in pieces], 1), full.exit_logits[e],
                                   atol=1e-4, rtol=0)


def test_cache_rejects_gaps_and_overlaps(tiny_dir):
    model = coexit.load(tiny_dir)
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), cache=cache)
        with pytest.raises(coexit.CacheError, match="without gap or overlap"):
            model(torch.tensor([[8]]), positions=torch.tensor([5]), cache=cache)  # gap: 3, 4 missing
        with pytest.raises(coexit.CacheError, match="without gap or overlap"):
            model(torch.tensor([[8]]), positions=torch.tensor([1]), cache=cache)  # overlap
    assert cache.depth_lengths() == [3] * model.config.num_hidden_layers


def test_truncate_rolls_back(tiny_dir):
    model = coexit.load(tiny_dir)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        model(torch.tensor([[3, 4, 5, 9, 9]]), cache=cache)
        cache.truncate(3)
        again = model(ids[:, 3:], cache=cache)
    torch.testing.assert_close(again.logits, full.logits[:, 3:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("b,h,kv,s", [(3, 6, 2, 37), (1, 32, 4, 100), (2, 4, 4, 9)])
def test_one_query_attention_equals_grouped_query_sdpa(b, h, kv, s):
    """attend_one (each KV head's query heads as query rows of that head) gives SDPA's own grouped-query attention
    to rounding, with and without a mask; and `attend` at one query takes the same path, so a decode step without a
    mask equals the masked one bit for bit where every key is visible."""
    from coexit.attention import attend, attend_one

    g = torch.Generator().manual_seed(b * 100 + s)
    q = torch.randn(b, 1, h, 16, generator=g).transpose(1, 2)  # (B, H, 1, D) as the model makes it
    k, v = (torch.randn(b, kv, s + 5, 16, generator=g)[:, :, :s] for _ in range(2))
    lengths = torch.randint(1, s + 1, (b,), generator=g)
    mask = (torch.arange(s)[None] < lengths[:, None])[:, None, None, :]
    for m in (mask, None):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=h != kv)
        torch.testing.assert_close(attend_one(q, k, v, m), want, atol=1e-6, rtol=0)
    key_pos = torch.arange(s)[None].expand(b, -1)
    every = torch.full((b, 1), s - 1)
    assert torch.equal(attend(q, k, v, every, key_pos), attend_one(q, k, v))
