"""coexit's logits equal transformers' LlamaForCausalLM / Qwen2ForCausalLM on the same random weights."""

from __future__ import annotations

import pytest
import torch

import coexit

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, max_position_embeddings=256)
CASES = {
    "llama-gqa-untied": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-mha-tied": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3-rope-scaling": ("llama", dict(
        num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32))),
    "qwen2-gqa-tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-mha-untied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
}


def _hf_model(kind: str, extra: dict, seed: int):
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**COMMON, **extra)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**COMMON, **extra)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # make every tensor non-trivial (biases and norms included)
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path, caplog):
    kind, extra = CASES[case]
    hf = _hf_model(kind, extra, seed=hash(case) % 1000)
    hf.save_pretrained(tmp_path)
    model = coexit.load(tmp_path)
    assert model.config.model_type == kind
    assert model.config.attention_bias == (kind == "qwen2")
    assert model.config.tie_word_embeddings == extra.get("tie_word_embeddings", False)
    # a plain HF directory gets exits initialised from the final norm/head, and the load says so
    assert model.initialised_exits == model.config.exit_layers
    assert "initialised them from the final norm and LM head" in caplog.text

    ids = torch.randint(0, COMMON["vocab_size"], (2, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        ours = model(ids, exits="all")
    torch.testing.assert_close(ours.logits, ref.logits, atol=1e-4, rtol=0)
    for e, logits in ours.exit_logits.items():  # exit e = final norm + head on the hidden state after e layers
        expect = hf.lm_head(hf.model.norm(ref.hidden_states[e]))
        torch.testing.assert_close(logits, expect, atol=1e-4, rtol=0)


def test_llama3_scaling_changes_logits(tmp_path):
    """Guard the test above: rope scaling really alters the result at long positions."""
    kind, extra = CASES["llama3-rope-scaling"]
    hf = _hf_model(kind, extra, seed=3)
    hf.save_pretrained(tmp_path)
    scaled = coexit.load(tmp_path)
    plain = coexit.EarlyExitLM(scaled.config.replace(rope_scaling=None))
    plain.load_state_dict(scaled.state_dict())
    ids = torch.randint(0, 96, (1, 120), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (scaled(ids).logits - plain(ids).logits).abs().max() > 1e-3
