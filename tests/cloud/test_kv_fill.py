"""kv_fill=PROPAGATE over a real gRPC server: fill rows' deep KV equals each layer's projections of the row (checked
against a cache-free reference that runs every row and puts the fill rows back), their compute is skipped (layer-
token counts), and the edge flags exactly the positions that exited on it."""

from __future__ import annotations

import grpc
import pytest
import torch

import coexit
from coexit.exits import ExitPolicy
from coexit.v1 import coexit_pb2 as pb
from coexit.v1 import coexit_pb2_grpc as pb_grpc
from coexit.v1.convert import tensor_from_proto, tensor_to_proto
from edge.backends import TorchBackend
from edge.client import EdgeClient


@torch.no_grad()
def reference_logits(model, rows: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Deep layers without a cache: every row runs each layer (so every k, v is the projection of the row's
    input to that layer), then fill rows are put back to their input: exactly CALM's state propagation."""
    c = model.config
    h = rows[None]
    positions = torch.arange(rows.shape[0])[None]
    cos, sin = model.rotary(positions, h.dtype)
    for layer in range(c.split_layer, c.num_hidden_layers):
        out = model.model.layers[str(layer)](h, cos, sin, positions, None)
        out[0, fill] = h[0, fill]
        h = out
    return model.head_logits(c.num_hidden_layers, h[0])


def _rows(model, n: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.stage(0, model.config.split_layer)(ids).hidden[0]


def _open(stub, model, kv_fill=pb.PROPAGATE, **kw):
    return pb.SessionRequest(open=pb.OpenRequest(fingerprint=model.fingerprint, encoding=pb.FP32, kv_fill=kv_fill,
                                                 **kw))


def _append(rows, first, fill, **kw):
    return pb.SessionRequest(append=pb.AppendRequest(first_position=first, hidden=tensor_to_proto(rows, "fp32"),
                                                     fill_rows=fill, **kw))


@pytest.mark.parametrize("chunks", [[12], [5, 1, 4, 2]])
def test_propagated_kv_equals_reference(tiny_dir, served, chunks):
    model = coexit.load(tiny_dir)
    c = model.config
    n = sum(chunks)
    rows = _rows(model, n)
    fill = torch.zeros(n, dtype=torch.bool)
    fill[[1, 2, 5, 6, 7, 9]] = True  # edge-exited positions (chunk ends among them; the last row is not)
    stub = pb_grpc.CoexitStub(grpc.insecure_channel(served.address))
    msgs, first = [_open(stub, model)], 0
    for k in chunks:
        idx = [i for i in range(k) if fill[first + i]]
        last = first + k == n  # earlier chunks go up without asking for a token (computed in the background)
        msgs.append(_append(rows[first:first + k], first, idx, want_token=last, want_logits=last))
        first += k
    replies = [r.appended for r in list(stub.Session(iter(msgs)))[1:]]
    deep = c.num_hidden_layers - c.split_layer
    assert sum(r.layer_tokens for r in replies) == int((~fill).sum()) * deep
    assert sum(r.filled_layer_rows for r in replies) == int(fill.sum()) * deep
    want = reference_logits(model, rows, fill)
    got = tensor_from_proto(replies[-1].logits)[0]
    torch.testing.assert_close(got, want[-1], rtol=1e-4, atol=1e-4)
    exact = reference_logits(model, rows, torch.zeros(n, dtype=torch.bool))
    assert not torch.allclose(exact[-1], want[-1], atol=1e-3)  # propagation really changed the KV


def test_propagate_refusals(tiny_dir, served):
    model = coexit.load(tiny_dir)
    stub = pb_grpc.CoexitStub(grpc.insecure_channel(served.address))
    rows = _rows(model, 3)
    cases = [
        [_open(stub, model, cloud_exits=[pb.CloudExit(layer=4, threshold=0.5)])],  # with cloud exits
        [_open(stub, model), _append(rows, 0, [2], want_token=True)],  # the wanted row cannot be filled
        [_open(stub, model), _append(rows, 0, [1, 1])],  # not increasing
        [_open(stub, model), _append(rows, 0, [3])],  # past the rows
        [_open(stub, model), _append(rows, 0, [], drafts=[pb.Draft(position=3, token_id=1)])],  # lossless + propagate
        [_open(stub, model, kv_fill=7)],
    ]
    for msgs in cases:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Session(iter(msgs)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, msgs


def test_edge_flags_exactly_its_exited_positions(tiny_dir, served):
    full = coexit.load(tiny_dir)
    c = full.config
    deep = c.num_hidden_layers - c.split_layer
    client = EdgeClient(TorchBackend.from_checkpoint(tiny_dir), full.tokenizer, cloud=served.address)
    ids = full.tokenizer.encode("class Point:\n    def __init__(self, x, y):", add_bos=True)
    policy = ExitPolicy({2: 0.25, 3: 0.2})
    exact = client.generate(ids, 24, policy=policy, stop_at_eos=False)
    client.kv_fill = "propagate"
    approx = client.generate(ids, 24, policy=policy, stop_at_eos=False)
    never = client.generate(ids, 12, policy=ExitPolicy.never(), stop_at_eos=False)
    client.kv_fill = "exact"
    client.close()
    n_edge = sum(e.origin == "edge" for e in approx.events)
    assert 0 < n_edge < len(approx.events)
    # the cloud computed every uploaded position but the edge-exited ones, and filled those
    uploaded = len(approx.counters.uploads[0])
    assert approx.counters.cloud_layer_tokens == (uploaded - approx.counters.cloud_filled_rows // deep) * deep
    edge_rows_uploaded = sum(1 for e in approx.events if e.origin == "edge" and e.position - 1 < uploaded)
    assert approx.counters.cloud_filled_rows == edge_rows_uploaded * deep
    assert approx.counters.cloud_layer_tokens < exact.counters.cloud_layer_tokens
    # the tokens made before the first edge exit are the same; without exits propagate is exact
    first_edge = next(i for i, e in enumerate(exact.events) if e.origin == "edge")
    assert approx.tokens[:first_edge + 1] == exact.tokens[:first_edge + 1]
    assert never.counters.cloud_filled_rows == 0
