"""Tensor-parallel loading (cloud.tp): two real torchrun ranks on gloo load GQA checkpoints (tied embeddings; one with
Qwen2's qkv bias) sharded with parallelize_module, whole and deep-only, and each compares itself with the unsharded
load: every exit's and the final head's logits over a KV cache (a prefill chunk, a chunk with propagated KV, three
decode steps), each sharded linear at exactly half its bytes, only slices of the sharded tensors read from the
file, the same fingerprint, the LM head still tied; the localized model (plain shards plus all_reduce hooks) gives
the DTensor model's logits exactly. Plus the refusals: a model that does not split over N, and a
--tp N that torchrun did not start."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import coexit
from cloud import tp as tpmod
from coexit.config import Config
from coexit.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("tp_shard_worker.py")
FLAVOURS = ("tiny-tied", "tiny-qwen2")  # 4 heads over 2 KV heads; qwen2 adds q/k/v bias; both tie the LM head


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(checkpoint_factory, tmp_path_factory):
    dirs = [checkpoint_factory(f) for f in FLAVOURS]
    out = tmp_path_factory.mktemp("tp_out")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), str(out), *map(str, dirs)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_sharded_logits_equal_unsharded(ranks):
    for rank in ranks:
        assert rank["broadcast"] == {"plan": [1, 2, 3]}  # the gloo cpu_group carries objects
        assert len(rank["models"]) == len(FLAVOURS) * 2 * 2
        for key, m in rank["models"].items():
            name, part, dtype = key.split(":")
            assert m["dtype"] == f"torch.{dtype}", key  # fp32 came from the file (dtype=None)
            assert m["heads_compared"] == (["2", "3", "4", "final"] if part == "whole" else ["4", "final"]), key
            # fp64: the shards compute exactly what the whole matrices do; fp32: partial sums round differently
            assert m["max_diff"] <= (1e-9 if dtype == "float64" else 3e-5), (key, m["max_diff"])
            assert m["fingerprint_equal"], key
            assert m["tied"] is (True if part == "whole" else None), key
            assert m["kv_heads"] == 1
            # localized (plain shards + all_reduce hooks): the DTensor model's values exactly
            assert m["local_vs_dtensor"] == 0.0 and m["local_vs_full"] == m["max_diff"], key
            assert not m["local_has_dtensor"]
            assert m["local_bytes"] == [m["weight_bytes"], m["full_bytes"]], key


def test_each_rank_holds_half_of_every_sharded_linear(ranks):
    for rank in ranks:
        for key, m in rank["models"].items():
            for i, block in m["blocks"].items():
                assert block["heads"] == [2, 1], (key, i)  # local query heads, local KV heads
                sharded = replicated = 0
                for name, p in block["params"].items():
                    assert p["global"] == p["full"], (key, name)
                    if name == "self_attn.o_proj.weight" or name == "mlp.down_proj.weight":
                        assert p["placements"] == ["S(1)"], (key, name)
                    elif "proj" in name:
                        assert p["placements"] == ["S(0)"], (key, name)
                    if p["placements"]:
                        assert 2 * p["local"] == p["full"], (key, name)
                        sharded += p["full"]
                    else:
                        assert "norm" in name and p["local"] == p["full"], (key, name)
                        replicated += p["full"]
                assert block["full"] == sharded + replicated
                assert block["local"] == sharded // 2 + replicated
            n_blocks = len(m["blocks"])
            per_block = next(iter(m["blocks"].values()))
            halved = n_blocks * (per_block["full"] - per_block["local"])
            assert m["weight_bytes"] == m["full_bytes"] - halved, key
            assert m["global_bytes"] == m["full_bytes"], key
            assert m["describe"].startswith(f"rank {rank['rank']}/2: decoder layers "), m["describe"]
            assert "full stage" in m["describe"] and m["describe"].endswith("KV 3.0 MiB")


def test_each_rank_reads_only_its_slices(ranks):
    for rank in ranks:
        for key, m in rank["models"].items():
            sharded = set(m["sharded_names"])
            assert sharded, key
            assert not sharded & set(m["read_whole"]), key  # never get_tensor on a sharded tensor
            assert {s[0] for s in m["read_slices"]} == sharded, key
            for name, file_shape, read_shape in m["read_slices"]:
                dim = 1 if name.endswith(("o_proj.weight", "down_proj.weight")) else 0
                assert read_shape[dim] * 2 == file_shape[dim], (key, name)
                assert [n for d, n in enumerate(read_shape) if d != dim] == \
                    [n for d, n in enumerate(file_shape) if d != dim], (key, name)


def test_refuses_a_model_that_does_not_split():
    cfg = Config.flavour("tiny")  # 2 KV heads, intermediate 128
    with pytest.raises(UsageError, match=r"num_key_value_heads \(2\).*not divisible by 4.*\[1, 2\]"):
        tpmod.check_shardable(cfg, 4)
    mha = dataclasses.replace(Config.flavour("tiny-mha"), intermediate_size=130)  # 4 KV heads split, the MLP not
    with pytest.raises(UsageError, match=r"intermediate_size \(130\) not divisible by 4"):
        tpmod.check_shardable(mha, 4)
    tpmod.check_shardable(cfg, 2)


def test_refuses_before_loading(tiny_dir):
    with pytest.raises(UsageError, match="num_key_value_heads"):
        tpmod.load_sharded(tiny_dir, tpmod.TP(rank=0, world=4), deep_only=True)
    with pytest.raises(UsageError, match="init_tp"):
        tpmod.load_sharded(tiny_dir, tpmod.TP(rank=0, world=2), deep_only=True)


def test_init_tp_needs_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UsageError, match=r"torchrun --nproc_per_node 2 -m coexit serve --tp 2"):
        tpmod.init_tp(2, "cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UsageError, match=r"torchrun started 3 processes.*--nproc_per_node 2"):
        tpmod.init_tp(2, "cpu")
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    one = tpmod.init_tp(1, "cpu")
    assert (one.rank, one.world, one.mesh) == (0, 1, None)


def test_one_rank_is_the_plain_load(tiny_dir):
    model = tpmod.load_sharded(tiny_dir, tpmod.TP(rank=0, world=1), deep_only=True, dtype=torch.float32)
    ref = coexit.load(tiny_dir, layers=model.layer_range, dtype=torch.float32)
    assert not any(hasattr(p, "placements") for p in model.parameters())
    assert model.fingerprint == ref.fingerprint
    assert tpmod.weight_bytes(model) == tpmod.weight_bytes(model, local=False) == tpmod.weight_bytes(ref)
    assert tpmod.kv_heads(model.config, None) == model.config.num_key_value_heads
    assert model.new_cache().n_kv == model.config.num_key_value_heads
