"""Every edge backend against a real cloud server: the cloud cannot tell them apart.

- never exit: each cloud token is the full model's deep stage applied to the split rows that backend produced
  (for GGUF f32 that is the full model's own greedy output, token for token);
- always exit: collaborative output equals standalone output with the same backend, and nothing crosses.
"""

from __future__ import annotations

import pytest
import torch

import coexit
from cloud.server import ServerThread
from coexit.decoding import generate_full
from coexit.exits import ExitPolicy
from edge.backends import make_backend
from edge.client import EdgeClient

BACKENDS = [("torch", {}), ("bnb-int8", {}), ("bnb-nf4", {}),
            ("gguf", {"quant": "f32", "kv_type": "f32", "layout": "segments"}),
            ("gguf", {"quant": "f32", "kv_type": "f32", "layout": "whole"}),
            ("gguf", {"quant": "q8_0", "layout": "segments"}), ("gguf", {"quant": "q4_k_m", "layout": "whole"})]
IDS = [f"{k}-{kw.get('quant', '')}-{kw.get('layout', '')}".rstrip("-") for k, kw in BACKENDS]


@pytest.fixture(scope="module")
def cloud(quant_dir):
    model = coexit.load(quant_dir)
    with ServerThread(model) as srv:
        yield srv, model


def _backend(kind, kw, quant_dir, tmp_path):
    kw = dict(kw)
    if kind == "gguf":
        kw["out"] = tmp_path / f"edge-{kw['quant']}.{'gguf' if kw['layout'] == 'whole' else 'segments'}"
    return make_backend(kind, quant_dir, **kw)


@pytest.mark.parametrize("kind, kw", BACKENDS, ids=IDS)
def test_never_exit_cloud_finishes_each_backend(kind, kw, quant_dir, cloud, tmp_path):
    srv, full = cloud
    backend = _backend(kind, kw, quant_dir, tmp_path)
    assert backend.fingerprint == full.fingerprint
    client = EdgeClient(backend, full.tokenizer, cloud=srv.address, prefill_chunk=8)
    ids = full.tokenizer.encode("class Point:\n    def __init__(self, x, y):\n", add_bos=True)
    gen = client.generate(ids, 12, policy=ExitPolicy.never(), stop_at_eos=False)
    assert {e.origin for e in gen.events} == {"cloud"} and len(gen.events) == 12
    # replay the same tokens through this backend, then the deep stage in torch: the cloud's tokens must match
    backend.reset()
    seq = ids + gen.tokens
    backend.step(seq[:-1], 0, None)
    _, rows = backend.take_split_rows()
    split, L = full.config.split_layer, full.config.num_hidden_layers
    with torch.no_grad():
        logits = full.stage(split, L)(rows[None]).logits[0]
    for e in gen.events:
        assert e.token_id == int(logits[e.position - 1].argmax()), (kind, e.position)
    if kind == "gguf" and kw["quant"] == "f32":
        assert gen.tokens == generate_full(full, ids, 12)
    client.close()


@pytest.mark.parametrize("kind, kw", BACKENDS, ids=IDS)
def test_always_exit_equals_standalone_each_backend(kind, kw, quant_dir, cloud, tmp_path):
    srv, full = cloud
    client = EdgeClient(_backend(kind, kw, quant_dir, tmp_path), full.tokenizer, cloud=srv.address)
    ids = full.tokenizer.encode("def add(a, b):\n", add_bos=True)
    policy = ExitPolicy.always(1)
    collab = client.generate(ids, 10, policy=policy, stop_at_eos=False)
    alone = client.generate(ids, 10, policy=policy, mode="standalone", stop_at_eos=False)
    assert collab.tokens == alone.tokens
    assert {e.exit_layer for e in collab.events} == {1} and collab.counters.bytes_up == 0
    client.close()
