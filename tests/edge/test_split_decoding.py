"""Split decoding over a real gRPC server on loopback: exactness with no exits, always-exit equals standalone,
the cloud's KV after catch-up equals the full model's, exact upload accounting, encodings, concurrency."""

from __future__ import annotations

import threading

import pytest
import torch

import coexit
from cloud.server import ServerThread
from coexit import wire
from coexit.decoding import generate_full
from coexit.exits import ExitPolicy
from edge.backends import TorchBackend
from edge.client import EdgeClient

PROMPTS = ["def add(a, b):",
           "import os\nimport sys\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
           "for i in range(10):"]


def client_for(model_dir, address, **kw) -> EdgeClient:
    return EdgeClient(TorchBackend.from_checkpoint(model_dir), coexit.load(model_dir).tokenizer, cloud=address, **kw)


@pytest.mark.parametrize("split", [2, 3, 4])
def test_no_exits_equals_full_model(split, split_dir):
    d = split_dir(split)
    full = coexit.load(d)
    with ServerThread(full) as srv:
        client = client_for(d, srv.address, prefill_chunk=8)  # the longer prompts span several chunks
        for prompt in PROMPTS:
            gen = client.generate(prompt, 20, policy=ExitPolicy.never(), stop_at_eos=False)
            assert gen.tokens == generate_full(full, gen.prompt_ids, 20)
            assert all(e.origin == "cloud" and e.exit_layer == 6 for e in gen.events)
            assert gen.counters.fallbacks == 20
        client.close()


def test_always_exit_equals_standalone(tiny_dir, served):
    client = client_for(tiny_dir, served.address)
    for e in (2, 3):
        policy = ExitPolicy.always(e)
        collab = client.generate(PROMPTS[0], 16, policy=policy, stop_at_eos=False)
        alone = client.generate(PROMPTS[0], 16, policy=policy, mode="standalone", stop_at_eos=False)
        assert collab.tokens == alone.tokens
        assert {ev.origin for ev in collab.events} == {"edge"} and {ev.exit_layer for ev in collab.events} == {e}
        assert collab.counters.bytes_up == 0 and collab.counters.fallbacks == 0
    # standalone with no confident exit uses the deepest edge exit: the split head
    deepest = client.generate(PROMPTS[0], 8, policy=ExitPolicy.never(), mode="standalone", stop_at_eos=False)
    assert {ev.exit_layer for ev in deepest.events} == {3}
    client.close()


def _mixed_policy(model, prompt_ids):
    """Thresholds at the median edge-exit confidence along the full model's greedy path: a real mix."""
    seq = prompt_ids + generate_full(model, prompt_ids, 24)
    with torch.no_grad():
        out = model(torch.tensor([seq]), exits="all")
    thresholds = {e: float(torch.softmax(out.exit_logits[e][0], -1).max(-1).values.median()) for e in (2, 3)}
    return ExitPolicy(thresholds)


def test_mixed_exits_cloud_kv_equals_full_model(tiny_dir, served):
    full = coexit.load(tiny_dir)
    client = client_for(tiny_dir, served.address)
    prompt_ids = full.tokenizer.encode(PROMPTS[1], add_bos=True)
    run = client.stream(prompt_ids, 24, policy=_mixed_policy(full, prompt_ids), stop_at_eos=False)
    events = []
    for ev in run:
        events.append(ev)
        if len(events) == 24:
            # the stream is still open: look at the live session on the server
            (session,) = served.service.manager.sessions.values()
            cloud_len = session.length
            cache, split = session.runner.cache, full.config.split_layer
            # copy the KV now: the session's blocks go back to the pool when the stream closes
            held = {i: (cache.length(i), [t.clone() for t in cache.get(i)])
                    for i in range(split, full.config.num_hidden_layers)}
            seq = prompt_ids + [e.token_id for e in events]
    origins = [e.origin for e in events]
    assert "edge" in origins and "cloud" in origins, origins
    last_cloud = max(i for i, e in enumerate(events) if e.origin == "cloud")
    assert any(e.origin == "edge" for e in events[:last_cloud]), "no edge exit was caught up by a later fallback"
    assert cloud_len == events[last_cloud].position  # the cloud holds every position before its last token
    ref = full.new_cache()
    with torch.no_grad():
        full(torch.tensor([seq[:cloud_len]]), cache=ref)
    for layer in range(split, full.config.num_hidden_layers):
        length, (k, v) = held[layer]
        assert length == cloud_len
        rk, rv = ref.get(layer)
        torch.testing.assert_close(k, rk, atol=1e-4, rtol=0)
        torch.testing.assert_close(v, rv, atol=1e-4, rtol=0)
    client.close()


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
def test_upload_accounting(encoding, tiny_dir, served):
    full = coexit.load(tiny_dir)
    client = client_for(tiny_dir, served.address, encoding=encoding, prefill_chunk=8)
    prompt_ids = full.tokenizer.encode(PROMPTS[1], add_bos=True)
    gen = client.generate(prompt_ids, 24, policy=_mixed_policy(full, prompt_ids), stop_at_eos=False)
    c = gen.counters
    (uploaded,) = c.uploads
    assert len(uploaded) == len(set(uploaded)), "a position crossed twice"
    assert uploaded == list(range(len(uploaded)))
    last_cloud = max(e.position for e in gen.events if e.origin == "cloud")
    assert len(uploaded) == last_cloud
    assert c.payload_up == len(uploaded) * wire.bytes_per_row(encoding, full.config.hidden_size)
    ((received, sent),) = c.server_bytes
    assert received == c.bytes_up  # both sides count the same protobuf bytes
    assert c.bytes_down > sent > 0
    client.close()


def test_encodings_stay_close_to_fp32(tiny_dir, served):
    """Same split rows, four encodings: the cloud's logits. Tolerances: fp16 0.02, bf16 0.15, int8 0.15
    (absolute, on logits whose spread is ~10); int8 and fp16 must still agree on the top token."""
    from coexit.v1 import coexit_pb2 as pb
    from coexit.v1.convert import ENCODING_CODES, tensor_from_proto, tensor_to_proto
    from edge.link import CloudLink

    full = coexit.load(tiny_dir)
    ids = torch.tensor([full.tokenizer.encode(PROMPTS[1], add_bos=True)])
    with torch.no_grad():
        rows = full.stage(0, full.config.split_layer)(ids).hidden[0]
        ref = full(ids).logits[0, -1]
    link = CloudLink(served.address)
    got = {}
    for enc in ("fp32", "fp16", "bf16", "int8"):
        s = link.stream()
        s.request(pb.SessionRequest(open=pb.OpenRequest(fingerprint=full.fingerprint, encoding=ENCODING_CODES[enc])))
        reply = s.request(pb.SessionRequest(append=pb.AppendRequest(
            first_position=0, hidden=tensor_to_proto(rows, enc), want_token=True, want_logits=True)))
        got[enc] = tensor_from_proto(reply.appended.logits)[0]
        s.close()
    link.close()
    assert ref.max() - ref.min() > 5
    torch.testing.assert_close(got["fp32"], ref, atol=1e-4, rtol=0)
    assert (got["fp16"] - ref).abs().max() < 0.02
    assert (got["bf16"] - ref).abs().max() < 0.15
    assert (got["int8"] - ref).abs().max() < 0.15
    assert int(got["int8"].argmax()) == int(ref.argmax()) == int(got["fp16"].argmax())


def test_concurrent_sessions_do_not_interfere(tiny_dir, served):
    full = coexit.load(tiny_dir)
    prompts = [PROMPTS[0], PROMPTS[2]]
    expected = [generate_full(full, full.tokenizer.encode(p, add_bos=True), 24) for p in prompts]
    results: dict[int, list[int]] = {}
    errors = []

    def worker(i):
        try:
            client = client_for(tiny_dir, served.address)
            results[i] = client.generate(prompts[i], 24, policy=ExitPolicy.never(), stop_at_eos=False).tokens
            client.close()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert [results[0], results[1]] == expected


def test_baselines_equal_full_model(tiny_dir, served):
    full = coexit.load(tiny_dir)
    client = client_for(tiny_dir, served.address)
    ids = full.tokenizer.encode(PROMPTS[0], add_bos=True)
    expected = generate_full(full, ids, 12)
    only = client.generate(ids, 12, mode="cloud-only", stop_at_eos=False)
    naive = client.generate(ids, 12, mode="naive-split", stop_at_eos=False)
    collab = client.generate(ids, 12, policy=ExitPolicy.never(), stop_at_eos=False)
    assert only.tokens == naive.tokens == collab.tokens == expected
    # naive split resends the whole context every step: far more bytes than collaborative
    assert naive.counters.payload_up == sum(range(len(ids), len(ids) + 12)) * full.config.hidden_size * 4
    assert collab.counters.payload_up == (len(ids) + 11) * full.config.hidden_size * 4
    client.close()


def test_sampling_is_identical_on_both_sides(tiny_dir, served):
    """Seeded sampling: the cloud and the edge draw the same token for the same logits and position."""
    full = coexit.load(tiny_dir)
    client = client_for(tiny_dir, served.address)
    s = coexit.SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=11)
    ids = full.tokenizer.encode(PROMPTS[0], add_bos=True)
    collab = client.generate(ids, 16, sampling=s, policy=ExitPolicy.never(), stop_at_eos=False)
    assert collab.tokens == generate_full(full, ids, 16, sampling=s)
    client.close()


def test_cloud_side_exits_with_kv_catch_up(tiny_dir, served):
    """Cloud exits at layer 4 (half the time, by threshold): each token equals the head it came from, applied to
    the exact hidden state of the full model, so the layers above a cloud exit were caught up correctly."""
    full = coexit.load(tiny_dir)
    ids = full.tokenizer.encode(PROMPTS[1], add_bos=True)
    seq0 = ids + generate_full(full, ids, 24)
    with torch.no_grad():
        conf = torch.softmax(full(torch.tensor([seq0]), exits=[4]).exit_logits[4][0], -1).max(-1).values
    client = client_for(tiny_dir, served.address, cloud_exits={4: float(conf.median())})
    gen = client.generate(ids, 24, policy=ExitPolicy.never(), stop_at_eos=False)
    layers = [e.exit_layer for e in gen.events]
    assert 4 in layers and 6 in layers, layers
    seq = ids + gen.tokens
    with torch.no_grad():
        out = full(torch.tensor([seq]), exits=[4])
    for e in gen.events:
        logits = out.exit_logits[4] if e.exit_layer == 4 else out.logits
        assert e.token_id == int(logits[0, e.position - 1].argmax())
    client.close()
