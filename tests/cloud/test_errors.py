"""Every malformed request gets its status code and an actionable message; the server then keeps serving,
and a refused Append leaves its session intact."""

from __future__ import annotations

import math

import grpc
import pytest
import torch

import coexit
from cloud.server import ServerThread
from cloud.sessions import Limits
from coexit.decoding import generate_full
from coexit.exits import ExitPolicy
from coexit.v1 import coexit_pb2 as pb
from coexit.v1.convert import ENCODING_CODES, tensor_to_proto
from edge.backends import TorchBackend
from edge.client import EdgeClient
from edge.link import CloudError, CloudLink


@pytest.fixture(scope="module")
def model(tiny_dir):
    return coexit.load(tiny_dir)


@pytest.fixture(scope="module")
def rows(model):
    ids = torch.tensor([model.tokenizer.encode("def add(a, b):\n    return a + b", add_bos=True)])
    with torch.no_grad():
        return model.stage(0, model.config.split_layer)(ids).hidden[0]


def opened(link, model, **kw):
    s = link.stream()
    kw.setdefault("fingerprint", model.fingerprint)
    reply = s.request(pb.SessionRequest(open=pb.OpenRequest(**kw)))
    return s, reply.opened


def append(s, first, rows, enc="fp32", **kw):
    return s.request(pb.SessionRequest(append=pb.AppendRequest(first_position=first, hidden=tensor_to_proto(rows, enc),
                                                               want_token=True, **kw))).appended


def expect(code, match, fn):
    with pytest.raises(CloudError) as info:
        fn()
    assert info.value.code == code, info.value
    assert match in info.value.details, info.value.details


def still_serves(tiny_dir, address, model):
    client = EdgeClient(TorchBackend.from_checkpoint(tiny_dir), model.tokenizer, cloud=address)
    ids = model.tokenizer.encode("for i in range(3):", add_bos=True)
    assert client.generate(ids, 6, policy=ExitPolicy.never(), stop_at_eos=False).tokens == generate_full(model, ids, 6)
    client.close()


def test_invalid_arguments(tiny_dir, model, rows):
    limits = Limits(max_rows_per_append=64, max_message_bytes=12_000)
    with ServerThread(model, limits=limits) as srv:
        link = CloudLink(srv.address)
        INV = grpc.StatusCode.INVALID_ARGUMENT
        cases = {
            "hidden size": lambda s: append(s, 0, torch.zeros(3, 48)),
            "encoding mismatch": lambda s: append(s, 0, rows, enc="fp16"),
            "NaN": lambda s: append(s, 0, rows.clone().index_fill_(0, torch.tensor([2]), math.nan)),
            "Inf": lambda s: append(s, 0, rows.clone().index_fill_(0, torch.tensor([1]), math.inf)),
            "gap": lambda s: append(s, 5, rows),
            "oversize rows": lambda s: append(s, 0, torch.zeros(65, 1)),
            "oversize message": lambda s: append(s, 0, torch.zeros(60, 64) + 0.5, top_logprobs=1),
        }
        messages = {"hidden size": "hidden size is 64", "encoding mismatch": "encoding mismatch",
                    "NaN": "hold NaN or Inf", "Inf": "hold NaN or Inf", "gap": "(a gap)",
                    "oversize rows": "max_rows_per_append 64", "oversize message": "exceeds max_message_bytes"}
        for name, fn in cases.items():
            s, _ = opened(link, model, encoding=pb.FP32)
            expect(INV, messages[name], lambda s=s, fn=fn: fn(s))
        # overlap: a valid first Append, then one that repeats positions
        s, _ = opened(link, model, encoding=pb.FP32)
        append(s, 0, rows[:4])
        expect(INV, "(an overlap)", lambda: append(s, 2, rows[2:]))
        # a malformed payload (rows x cols disagree with the bytes)
        s, _ = opened(link, model, encoding=pb.FP32)
        bad = pb.Tensor(encoding=pb.FP32, rows=3, cols=64, data=b"\0" * 100)
        expect(INV, "malformed hidden tensor", lambda: s.request(pb.SessionRequest(
            append=pb.AppendRequest(first_position=0, hidden=bad, want_token=True))))
        expect(grpc.StatusCode.FAILED_PRECONDITION, "must be Open", lambda: link.stream().request(pb.SessionRequest(
            append=pb.AppendRequest(first_position=0))))
        expect(INV, "exceeds the server's limit", lambda: opened(link, model, max_length=10_000))
        link.close()
        still_serves(tiny_dir, srv.address, model)


def test_refused_append_leaves_session_intact(tiny_dir, model, rows):
    """A NaN Append is refused; resuming the session and continuing gives the same token as an undisturbed run."""
    with ServerThread(model) as srv:
        link = CloudLink(srv.address)
        s, op = opened(link, model, encoding=pb.FP32)
        append(s, 0, rows[:6])
        poisoned = rows[6:].clone()
        poisoned[0, 0] = math.nan
        expect(grpc.StatusCode.INVALID_ARGUMENT, "NaN", lambda: append(s, 6, poisoned))
        s2, op2 = opened(link, model, resume_id=op.session_id)
        assert op2.resumed and op2.length == 6
        token = append(s2, 6, rows[6:]).token_id
        with torch.no_grad():
            ids = torch.tensor([model.tokenizer.encode("def add(a, b):\n    return a + b", add_bos=True)])
            assert token == int(model(ids).logits[0, -1].argmax())
        link.close()


def test_fingerprint_and_resume_errors(tiny_dir, model):
    with ServerThread(model) as srv:
        link = CloudLink(srv.address)
        expect(grpc.StatusCode.FAILED_PRECONDITION, "fingerprint mismatch",
               lambda: opened(link, model, fingerprint="0" * 64))
        expect(grpc.StatusCode.NOT_FOUND, "open a new session", lambda: opened(link, model, resume_id="nope"))
        expect(grpc.StatusCode.INVALID_ARGUMENT, "not a cloud-side exit layer",
               lambda: opened(link, model, cloud_exits=[pb.CloudExit(layer=2, threshold=0.5)]))
        link.close()
        still_serves(tiny_dir, srv.address, model)


def block_limits(model, blocks: int, **kw) -> Limits:
    """Limits whose KV pool holds `blocks` blocks of 4 positions (one layer each)."""
    per_block = 2 * 4 * model.config.num_key_value_heads * model.config.head_dim * 4  # fp32
    return Limits(kv_budget_bytes=blocks * per_block, block_size=4, **kw)


def test_resource_limits(tiny_dir, model, rows):
    # 3 deep layers: 12 blocks hold 16 positions of one session
    with ServerThread(model, limits=block_limits(model, 12, max_sessions=2)) as srv:
        pool = srv.service.engine.pool
        link = CloudLink(srv.address)
        a, _ = opened(link, model, max_length=16)
        assert append(a, 0, rows[:12]).length == 12  # 9 blocks
        b, op_b = opened(link, model, max_length=16)
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "KV budget is full", lambda: append(b, 0, rows[:8]))
        b, op = opened(link, model, resume_id=op_b.session_id)  # the error ended the stream, not the session
        assert op.length == 0  # the refused rows left the session as it was, and it still serves
        assert append(b, 0, rows[:4]).length == 4
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "max_sessions 2", lambda: opened(link, model, max_length=10))
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "more than the whole pool",
               lambda: opened(link, model, max_length=200))
        for s in (a, b):
            s.request(pb.SessionRequest(close=pb.CloseRequest()))
        assert pool.num_free == pool.num_blocks  # every block came back
        still_serves(tiny_dir, srv.address, model)
        link.close()


def test_detached_sessions_are_evicted_lru_first(tiny_dir, model, rows):
    with ServerThread(model, limits=block_limits(model, 12, max_sessions=8)) as srv:
        pool = srv.service.engine.pool
        link = CloudLink(srv.address)
        old, op_old = opened(link, model, max_length=16)
        append(old, 0, rows[:8])  # 6 blocks
        new, op_new = opened(link, model, max_length=16)
        append(new, 0, rows[:4])  # 3 blocks
        old.cancel()  # detached first: least recently used
        new.cancel()
        s, _ = opened(link, model, max_length=16)
        assert append(s, 0, rows[:8]).has_token  # needs 6 blocks, 3 free: evicts `old` only
        expect(grpc.StatusCode.NOT_FOUND, "no session", lambda: opened(link, model, resume_id=op_old.session_id))
        r, op = opened(link, model, resume_id=op_new.session_id)
        assert op.resumed and op.length == 4
        assert pool.num_used == 9
        for stream in (s, r):
            stream.request(pb.SessionRequest(close=pb.CloseRequest()))
        assert pool.num_free == pool.num_blocks
        link.close()


def test_idle_ttl_expires_detached_sessions(tiny_dir, model, rows):
    import time

    with ServerThread(model, limits=Limits(idle_ttl_s=0.2)) as srv:
        link = CloudLink(srv.address)
        s, op = opened(link, model)
        append(s, 0, rows[:5])
        assert srv.service.engine.pool.num_used == 3  # ceil(5 / 16) = 1 block for each of 3 deep layers
        s.cancel()
        time.sleep(0.6)
        expect(grpc.StatusCode.NOT_FOUND, "expired", lambda: opened(link, model, resume_id=op.session_id))
        assert not srv.service.manager.sessions
        pool = srv.service.engine.pool
        assert pool.num_free == pool.num_blocks
        link.close()


def test_token_auth(tiny_dir, model):
    with ServerThread(model, token="s3cret") as srv:
        expect(grpc.StatusCode.UNAUTHENTICATED, "authorization: Bearer", lambda: CloudLink(srv.address).info())
        expect(grpc.StatusCode.UNAUTHENTICATED, "Bearer", lambda: CloudLink(srv.address, token="wrong").info())
        assert CloudLink(srv.address, token="s3cret").info().fingerprint == model.fingerprint


def test_health_and_reflection(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ch = grpc.insecure_channel(served.address)
    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="coexit.v1.Coexit"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    (reply,) = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"coexit.v1.Coexit", "grpc.health.v1.Health"} <= names
    info = CloudLink(served.address).info()
    assert (info.split_layer, info.num_layers, info.hidden_size, info.serves_tokens) == (3, 6, 64, True)
    assert set(info.encodings) == set(ENCODING_CODES.values())
    ch.close()
