"""Stage views: [0, s) followed by [s, L) equals the full model for every exit boundary s, and stages share the
full model's parameters (no copies)."""

from __future__ import annotations

import pytest
import torch

import coexit


@pytest.mark.parametrize("flavour", ["tiny", "tiny-mha", "tiny-qwen2"])
def test_stage_composition_equals_full(flavour, checkpoint_factory):
    model = coexit.load(checkpoint_factory(flavour))
    L = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, exits="all")
        for s in model.config.exit_layers:
            lower, upper = model.stage(0, s), model.stage(s, L)
            a = lower(ids, exits="all")
            b = upper(a.hidden, exits="all")
            assert a.logits is None and set(a.exit_logits) == {e for e in model.config.exit_layers if e <= s}
            torch.testing.assert_close(b.logits, full.logits, atol=1e-5, rtol=0)
            for e in model.config.exit_layers:
                got = a.exit_logits.get(e, b.exit_logits.get(e))
                torch.testing.assert_close(got, full.exit_logits[e], atol=1e-5, rtol=0)


def test_stage_with_caches_equals_full(tiny_dir):
    model = coexit.load(tiny_dir)
    s, L = model.config.split_layer, model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    lower, upper = model.stage(0, s), model.stage(s, L)
    edge_cache, cloud_cache = model.new_cache(), model.new_cache()
    with torch.no_grad():
        full = model(ids)
        outs = [upper(lower(ids[:, t:t + 1], cache=edge_cache).hidden, cache=cloud_cache).logits for t in range(16)]
    torch.testing.assert_close(torch.cat(outs, 1), full.logits, atol=1e-4, rtol=0)


def test_stage_shares_parameters(tiny_dir):
    model = coexit.load(tiny_dir)
    stage = model.stage(0, model.config.split_layer)
    full_ptrs = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in full_ptrs for p in stage.parameters())
    with torch.no_grad():
        model.model.layers["0"].mlp.up_proj.weight.add_(1.0)
    assert torch.equal(stage.layers["0"].mlp.up_proj.weight, model.model.layers["0"].mlp.up_proj.weight)


def test_partial_load_holds_only_its_layers(tiny_dir):
    full = coexit.load(tiny_dir)
    s, L = full.config.split_layer, full.config.num_hidden_layers
    edge = coexit.load(tiny_dir, layers=(0, s))
    cloud = coexit.load(tiny_dir, layers=(s, L))
    assert sorted(edge.model.layers) == [str(i) for i in range(s)]
    assert sorted(cloud.model.layers, key=int) == [str(i) for i in range(s, L)]
    assert not hasattr(cloud.model, "embed_tokens") and not hasattr(edge.model, "norm")
    ids = torch.randint(0, full.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mid = edge.stage(0, s)(ids, exits="all")
        top = cloud.stage(s, L)(mid.hidden, exits="all")
        ref = full(ids, exits="all")
    torch.testing.assert_close(top.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(mid.exit_logits[s], ref.exit_logits[s], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not inside"):
        edge.stage(0, L)
