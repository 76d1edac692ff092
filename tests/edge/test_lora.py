"""LoRA adapters in PEFT's layout (coexit.lora) wherever the edge runs: merged into the torch and bitsandbytes
edges, and exported as GGUF LoRA adapters that stock llama.cpp applies at run time (edge/export/lora.py), whole
and in segments. llama.cpp with the adapter must equal the torch edge with the adapter, within the tolerance the
backend tests use, and differ from the edge without it."""

from __future__ import annotations

import json

import pytest
import torch

import coexit
from coexit.lora import LoraConfig, add_lora, lora_state, merge_adapter, read_adapter, remove_lora, save_adapter
from edge.backends import make_backend

# quant_dir (tests/edge/conftest.py): 4 layers d 256, exits 1, 2, 3 with the split at 3


@pytest.fixture(scope="module")
def adapter(quant_dir, tmp_path_factory):
    """A trained-looking adapter: random A and B (a fresh one has B = 0 and changes nothing) on every edge layer."""
    model = coexit.load(quant_dir, layers=(0, 3))
    cfg = LoraConfig(r=8, alpha=16, layers=(0, 1, 2), base_fingerprint=model.fingerprint)
    g = torch.Generator().manual_seed(0)
    for m in add_lora(model, cfg):
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.02)
    return save_adapter(model, cfg, tmp_path_factory.mktemp("adapter") / "my-code"), model


def test_peft_layout_round_trip(adapter):
    path, wrapped = adapter
    d = json.loads((path / "adapter_config.json").read_text())
    assert d["peft_type"] == "LORA" and d["r"] == 8 and d["lora_alpha"] == 16
    assert d["layers_to_transform"] == [0, 1, 2] and "q_proj" in d["target_modules"]
    cfg, weights = read_adapter(path)
    assert len(weights) == 3 * 7
    state = lora_state(wrapped)
    a, b = weights[(1, "down_proj")]
    assert torch.equal(a, state["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"])
    assert torch.equal(b, state["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"])


def test_merged_equals_the_wrapped_model(adapter, quant_dir):
    path, wrapped = adapter
    merged = coexit.load(quant_dir, layers=(0, 3))
    plain = coexit.load(quant_dir, layers=(0, 3))
    merge_adapter(merged, path)
    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = wrapped.stage(0, 3)(ids, exits="all").exit_logits[3]
        got = merged.stage(0, 3)(ids, exits="all").exit_logits[3]
        base = plain.stage(0, 3)(ids, exits="all").exit_logits[3]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - base).abs().max() > 1e-2  # the adapter changes the edge
    remove_lora(wrapped)
    assert not lora_state(wrapped)


def _run(be, ids):
    be.reset()
    be.step(ids[:8], 0, None)
    logits = []
    for pos in range(8, len(ids)):
        r = be.step([ids[pos]], pos, lambda e, lg, h, p=pos: e == 1 + p % 3 and p % 4)
        logits.append(r.exit_logits[r.depth])
    be.step([7], len(ids), None)  # one deep token releases every parked row
    return be.take_split_rows()[1], torch.stack(logits)


@pytest.mark.parametrize("layout", ["whole", "segments"])
def test_llamacpp_applies_the_exported_adapter_like_torch(adapter, quant_dir, tmp_path, layout):
    path, _ = adapter
    ids = [int(x) for x in torch.randint(3, 500, (32,), generator=torch.Generator().manual_seed(0))]
    out = tmp_path / ("edge-f32.gguf" if layout == "whole" else "edge-f32.segments")
    llama = make_backend("gguf", quant_dir, quant="f32", kv_type="f32", layout=layout, out=out, adapter=path)
    rows, logits = _run(llama, ids)
    want_rows, want_logits = _run(make_backend("torch", quant_dir, adapter=path), ids)
    torch.testing.assert_close(rows, want_rows, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(logits, want_logits, rtol=2e-3, atol=2e-3)
    base_rows, _ = _run(make_backend("gguf", out, kv_type="f32"), ids)  # the same file without the adapter
    assert (base_rows - rows).abs().max() > 1e-2
    assert sorted(p.name for p in path.glob("lora-*.gguf"))  # the GGUF adapters sit beside the PEFT files


def test_bnb_edge_merges_before_quantizing(adapter, quant_dir):
    path, _ = adapter
    ids = [int(x) for x in torch.randint(3, 500, (16,), generator=torch.Generator().manual_seed(2))]
    with_adapter, _ = _run(make_backend("bnb-int8", quant_dir, adapter=path), ids)
    torch_rows, _ = _run(make_backend("torch", quant_dir, adapter=path), ids)
    plain, _ = _run(make_backend("bnb-int8", quant_dir), ids)
    assert (with_adapter - torch_rows).abs().mean() < (plain - torch_rows).abs().mean()


def test_an_adapter_of_another_checkpoint_is_refused(adapter, tiny_dir):
    from coexit.errors import CheckpointError

    path, _ = adapter
    with pytest.raises(CheckpointError, match="another checkpoint"):
        make_backend("torch", tiny_dir, adapter=path)
