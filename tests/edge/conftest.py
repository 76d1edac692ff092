"""Fixtures for the quantized edge backends: a quantization-friendly checkpoint, and a torch reference model
whose weights are the *dequantized* tensors of an edge GGUF (so llama.cpp can be checked against exactly the
weights it holds, separating kernel/runtime errors from the quantization error of the format itself)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from coexit.checkpoint import load, save
from coexit.config import Config, EarlyExitConfig
from coexit.tiny import SAMPLE_TEXT, random_model, train_bpe
from edge.export.gguf import unpermute_qk

# Rows are multiples of 256, so q8_0/q4_0 (blocks of 32) and k-quants (256) apply to every matrix, without
# llama.cpp's fallback types. Exits 1, 2, 3 with the split at 3; own exit projections (sidecar path in GGUF).
QUANT_CONFIG = Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                      eos_token_id=2, early_exit=EarlyExitConfig((1, 2, 3), 3, False, ()))
# Weight std 1/sqrt(hidden): each projection roughly preserves activation norms, like a trained model's layers.
# (coexit.tiny's std 0.2 makes attention saturate, so that tiny weight perturbations flip attention argmaxes.)
QUANT_STD = 1 / 16


def make_quant_checkpoint(path: Path, seed: int = 0) -> Path:
    model = random_model(QUANT_CONFIG, seed, std=QUANT_STD)
    return save(model, path, tokenizer=train_bpe(SAMPLE_TEXT * 4, QUANT_CONFIG.vocab_size))


# d 128: attention and ffn_gate/up rows are 128 wide (llama.cpp's k-quants fall back, as at the default model's d
# 384), ffn_down rows 256 wide (k-quants fit). Tied, shared heads like the default model; exits 1, 2, 3 with the split
# at 2: segments [0, 1) and [1, 2). The compression policy's and QAT's tests run on it.
NARROW_CONFIG = Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, bos_token_id=1,
                       eos_token_id=2, tie_word_embeddings=True, early_exit=EarlyExitConfig((1, 2, 3), 2, True, ()))


def make_narrow_checkpoint(path: Path, seed: int) -> Path:
    """A NARROW_CONFIG checkpoint at `path`, its calibration text beside it (path.parent / "calib.txt") and its
    importance matrix (imatrix.gguf) inside."""
    from edge.export.imatrix import compute

    d = save(random_model(NARROW_CONFIG, seed, std=1 / 11), path, tokenizer=train_bpe(SAMPLE_TEXT * 4, 512))
    text = d.parent / "calib.txt"
    text.write_text("".join(SAMPLE_TEXT) * 4)
    compute(d, [str(text)], tokens=512, chunk=64).save(d / "imatrix.gguf")
    return d


def dequantized_reference(gguf_path: Path, ckpt: Path):
    """The torch edge model of `ckpt` with every weight replaced by the GGUF's dequantized tensor."""
    cfg = load(ckpt, layers=(0, 1)).config
    model = load(ckpt, layers=(0, cfg.split_layer), dtype=torch.float32)
    r = gguf.GGUFReader(str(gguf_path))
    ts = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        ts[t.name] = np.array(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), np.float32).reshape(shape)
    sd = model.state_dict()
    new = {"model.embed_tokens.weight": ts["token_embd.weight"]}
    for i in range(cfg.split_layer):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        new[p + "self_attn.q_proj.weight"] = unpermute_qk(ts[b + "attn_q.weight"], cfg.num_attention_heads)
        new[p + "self_attn.k_proj.weight"] = unpermute_qk(ts[b + "attn_k.weight"], cfg.num_key_value_heads)
        new[p + "self_attn.v_proj.weight"] = ts[b + "attn_v.weight"]
        new[p + "self_attn.o_proj.weight"] = ts[b + "attn_output.weight"]
        new[p + "input_layernorm.weight"] = ts[b + "attn_norm.weight"]
        new[p + "post_attention_layernorm.weight"] = ts[b + "ffn_norm.weight"]
        for ours, theirs in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            new[p + f"mlp.{ours}.weight"] = ts[b + theirs + ".weight"]
    split = str(cfg.split_layer)
    new[f"exits.{split}.norm.weight"] = ts["output_norm.weight"]
    new[f"exits.{split}.lm_head.weight" if f"exits.{split}.lm_head.weight" in sd else "lm_head.weight"] = \
        ts["output.weight"]
    with torch.no_grad():
        for k, v in new.items():
            sd[k].copy_(torch.from_numpy(v))
    return model


@pytest.fixture(scope="session")
def quant_dir(tmp_path_factory):
    return make_quant_checkpoint(tmp_path_factory.mktemp("quant-ckpt"))


@pytest.fixture(scope="session")
def dequantized_model():
    return dequantized_reference
