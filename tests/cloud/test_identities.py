"""--auth-file identities: tokens stored as hashes, sessions bound to the identity that opened them (another
identity's resume is indistinguishable from an unknown id), and per-identity session and KV-share limits that
keep one identity from taking another's share."""

from __future__ import annotations

import grpc
import pytest
import torch

import coexit
from cloud.auth import Auth, hash_token
from cloud.server import ServerThread
from cloud.sessions import Limits
from coexit.v1 import coexit_pb2 as pb
from coexit.v1.convert import tensor_to_proto
from edge.link import CloudError, CloudLink

TOKENS = {"alice": "alice-secret", "bob": "bob-secret"}


@pytest.fixture(scope="module")
def model(tiny_dir):
    return coexit.load(tiny_dir)


@pytest.fixture(scope="module")
def auth_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "identities.toml"
    path.write_text(f"""
[identities.alice]
token_sha256 = "{hash_token(TOKENS['alice'])}"
max_sessions = 2
kv_share = 0.5

[identities.bob]
token_sha256 = "{hash_token(TOKENS['bob'])}"
kv_share = 0.5
""")
    return path


@pytest.fixture(scope="module")
def server(model, auth_file):
    per_block = 2 * 4 * model.config.num_key_value_heads * model.config.head_dim * 4
    limits = Limits(kv_budget_bytes=12 * per_block, block_size=4, max_sessions=16)  # 12 blocks: 16 positions
    with ServerThread(model, limits=limits, auth=Auth.from_file(auth_file)) as srv:
        yield srv


def rows_of(model, n):
    ids = torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        return model.stage(0, model.config.split_layer)(ids).hidden[0]


def opened(address, who, model, **kw):  # max_length 16: the most this 12-block pool holds
    s = CloudLink(address, token=TOKENS[who]).stream()
    kw.setdefault("max_length", 16)
    return s, s.request(pb.SessionRequest(open=pb.OpenRequest(fingerprint=model.fingerprint, **kw))).opened


def append(s, first, rows):
    return s.request(pb.SessionRequest(append=pb.AppendRequest(first_position=first,
                                                               hidden=tensor_to_proto(rows, "fp32"),
                                                               want_token=True))).appended


def expect(code, fn) -> str:
    with pytest.raises(CloudError) as info:
        fn()
    assert info.value.code == code, info.value
    return info.value.details


def test_file_holds_hashes_not_tokens(auth_file):
    text = auth_file.read_text()
    assert all(t not in text for t in TOKENS.values())
    assert "UNAUTHENTICATED" not in text and len(Auth.from_file(auth_file).identities) == 2


def test_only_the_opener_can_resume(server, model):
    s, op = opened(server.address, "alice", model)
    s.cancel()
    theirs = expect(grpc.StatusCode.NOT_FOUND,
                    lambda: opened(server.address, "bob", model, resume_id=op.session_id))
    unknown = expect(grpc.StatusCode.NOT_FOUND,
                     lambda: opened(server.address, "bob", model, resume_id="f" * len(op.session_id)))
    assert theirs.replace(op.session_id, "ID") == unknown.replace("f" * len(op.session_id), "ID")  # no probing
    s, op2 = opened(server.address, "alice", model, resume_id=op.session_id)
    assert op2.resumed
    s.request(pb.SessionRequest(close=pb.CloseRequest()))
    expect(grpc.StatusCode.UNAUTHENTICATED, lambda: CloudLink(server.address, token="nobody").info())


def test_per_identity_limits(server, model):
    pool = server.service.engine.pool
    rows = rows_of(model, 16)
    a1, _ = opened(server.address, "alice", model, max_length=16)
    a2, _ = opened(server.address, "alice", model, max_length=16)
    msg = expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: opened(server.address, "alice", model))
    assert "max_sessions" in msg
    assert append(a1, 0, rows[:8]).has_token  # alice: 6 blocks of 3 layers x 2 = her whole share
    msg = expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: append(a2, 0, rows[:4]))
    assert "kv_share" in msg
    b, _ = opened(server.address, "bob", model, max_length=16)
    assert append(b, 0, rows[:8]).has_token  # bob still gets all of his half
    assert pool.num_free == 0
    for s in (a1, b):
        s.request(pb.SessionRequest(close=pb.CloseRequest()))
    assert pool.num_free == pool.num_blocks


def test_bad_auth_files_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    for text, match in [("[identities.x]\ntoken_sha256 = 'abc'\n", "64 hex"),
                        (f"[identities.x]\ntoken_sha256 = '{'a' * 64}'\nkv_share = 2\n", "kv_share"),
                        (f"[identities.x]\ntoken = '{'a' * 64}'\n", "unknown keys")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            Auth.from_file(bad)
