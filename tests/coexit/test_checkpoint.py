"""Checkpoint round trip is bit-exact; bad checkpoints fail with a CheckpointError that names the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import coexit


@pytest.mark.parametrize("flavour", ["tiny", "tiny-mha", "tiny-tied", "tiny-llama3", "tiny-qwen2"])
def test_save_load_is_bit_exact(flavour, checkpoint_factory, tmp_path):
    src = checkpoint_factory(flavour)
    model = coexit.load(src)
    coexit.save(model, tmp_path / "again")
    again = coexit.load(tmp_path / "again")
    assert again.config == model.config
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert (src / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
    assert (src / "config.json").read_text() == (tmp_path / "again" / "config.json").read_text()
    assert again.tokenizer.encode("def f(x):") == model.tokenizer.encode("def f(x):")
    if model.config.tie_word_embeddings:
        assert again.lm_head.weight is again.model.embed_tokens.weight


def test_bf16_checkpoint_round_trip(tiny_dir, tmp_path):
    model = coexit.load(tiny_dir, dtype=torch.bfloat16)
    coexit.save(model, tmp_path / "bf16")
    again = coexit.load(tmp_path / "bf16")
    assert all(p.dtype == torch.bfloat16 for p in again.parameters())
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), again.state_dict().values()))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_weights_file(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "ck")
    (d / "model.safetensors").unlink()
    with pytest.raises(coexit.CheckpointError, match="model.safetensors is missing"):
        coexit.load(d)


def test_missing_config(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "ck")
    (d / "config.json").unlink()
    with pytest.raises(coexit.CheckpointError, match="config.json is missing"):
        coexit.load(d)


def test_missing_directory(tmp_path):
    with pytest.raises(coexit.CheckpointError, match="does not exist"):
        coexit.load(tmp_path / "nope")


def test_shape_mismatch(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "ck")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(7, 64)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(coexit.CheckpointError, match=r"model.layers.1.mlp.up_proj.weight.*shape \[7, 64\]"):
        coexit.load(d)


def test_missing_tensor(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "ck")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.2.self_attn.k_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(coexit.CheckpointError, match="lacks tensor 'model.layers.2.self_attn.k_proj.weight'"):
        coexit.load(d)


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if k == "early_exit":
            cfg["early_exit"].update(v)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def test_unknown_architecture(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "ck")
    _edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(coexit.CheckpointError, match="unknown architecture 'GPT2LMHeadModel'"):
        coexit.load(d)


@pytest.mark.parametrize("split, message", [
    (9, "split_layer 9 is out of range"),
    (0, "split_layer 0 is out of range"),
    (1, "split_layer 1 is not an exit layer"),
])
def test_bad_split_layer(tiny_dir, tmp_path, split, message):
    d = _copy(tiny_dir, tmp_path / "ck")
    _edit_config(d, early_exit={"split_layer": split})
    with pytest.raises(coexit.CheckpointError, match=message):
        coexit.load(d)


def test_exit_layer_out_of_range(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "ck")
    _edit_config(d, early_exit={"exit_layers": [2, 3, 6], "loss_weights": []})
    with pytest.raises(coexit.CheckpointError, match="exit_layers entry 6 is out of range"):
        coexit.load(d)


def test_corrupt_weights_file(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "ck")
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(coexit.CheckpointError, match="not a readable safetensors file"):
        coexit.load(d)


def test_missing_exit_heads_are_initialised(tiny_dir, tmp_path, caplog):
    d = _copy(tiny_dir, tmp_path / "ck")
    tensors = load_file(d / "model.safetensors")
    for k in [k for k in tensors if k.startswith("exits.2.")]:
        del tensors[k]
    save_file(tensors, d / "model.safetensors")
    model = coexit.load(d)
    assert model.initialised_exits == (2,)
    assert "no exit heads for layers [2]" in caplog.text
    assert torch.equal(model.exits["2"].norm.weight, model.model.norm.weight)
