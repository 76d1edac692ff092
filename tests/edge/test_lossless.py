"""Lossless mode over a real gRPC server: edge exits draft, the cloud verifies, and the output is the full model's
token for token (greedy) or in distribution (sampling); forced rejections at the first, a middle and the last
draft, rollbacks across upload chunks, a cloud restart mid-verification, and the protocol's refusals."""

from __future__ import annotations

import time

import grpc
import pytest
import torch

import coexit
from cloud.launch import free_port, start_cloud
from cloud.server import ServerThread
from cloud.sessions import Limits
from coexit.decoding import RunResult, generate_full
from coexit.exits import ExitPolicy
from coexit.v1 import coexit_pb2 as pb
from edge.backends import TorchBackend
from edge.client import EdgeClient
from edge.link import CloudError

PROMPT = "import os\nimport sys\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"


class ScriptedDrafts(TorchBackend):
    """A torch edge whose exit drafts the full model's own token at every position (`truth`), except once at each
    position in `wrong`, where it drafts the given wrong token: the only rejections are the forced ones. Rows and
    KV are the real edge computation; only the exit logits are replaced."""

    def __init__(self, model, truth: dict[int, int], wrong: dict[int, int]) -> None:
        super().__init__(model)
        self.truth, self.wrong = truth, wrong  # position of the drafted token -> token

    def step(self, token_ids, first, decide, to_split=False) -> RunResult:
        res = super().step(token_ids, first, decide, to_split)
        nxt = first + len(token_ids)
        token = self.wrong.pop(nxt) if nxt in self.wrong else self.truth.get(nxt)
        if token is not None and res.exited:
            logits = torch.full_like(res.exit_logits[res.depth], -30.0)
            logits[token] = 30.0
            res.exit_logits[res.depth] = logits
        return res


def scripted(d, ids, expected, wrong) -> ScriptedDrafts:
    model = coexit.load(d, layers=(0, coexit.load(d).config.split_layer))
    return ScriptedDrafts(model, {len(ids) + i: t for i, t in enumerate(expected)}, dict(wrong))


def _client(d, address, backend=None, **kw) -> EdgeClient:
    model = coexit.load(d)
    be = backend or TorchBackend.from_checkpoint(d)
    return EdgeClient(be, model.tokenizer, cloud=address, mode="lossless", **kw)


@pytest.mark.parametrize("policy", ["always2", "always3", "mixed", "never", "split"])
def test_greedy_equals_full_model(tiny_dir, served, policy):
    full = coexit.load(tiny_dir)
    ids = full.tokenizer.encode(PROMPT, add_bos=True)
    expected = generate_full(full, ids, 24)
    pol = {"always2": ExitPolicy.always(2), "always3": ExitPolicy.always(3), "never": ExitPolicy.never(),
           "mixed": ExitPolicy({2: 0.3, 3: 0.2}), "split": ExitPolicy.never()}[policy]
    # "never" with draft_always off: no drafts at all; "split": no confident exit, so every draft is the split's
    client = _client(tiny_dir, served.address, max_drafts=4, draft_always=policy != "never")
    gen = client.generate(ids, 24, policy=pol, stop_at_eos=False)
    client.close()
    assert gen.tokens == expected
    c = gen.counters
    if policy == "never":
        assert c.drafts == 0 and {e.origin for e in gen.events} == {"cloud"}
    elif policy == "split":
        assert c.fallbacks == 0 and {e.exit_layer for e in gen.events if e.origin == "edge"} <= {3}
    else:
        assert c.drafts > 0 and c.accepted + c.rejected <= c.drafts
        assert sum(e.origin == "edge" for e in gen.events) == c.accepted
    # every verified position's split row went up once per session (rollbacks re-send the rows after them)
    assert c.uploads[0][: len(ids)] == list(range(len(ids)))


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_forced_rejections(tiny_dir, served, where):
    full = coexit.load(tiny_dir)
    ids = full.tokenizer.encode(PROMPT, add_bos=True)
    n, new = len(ids), 12
    expected = generate_full(full, ids, new)
    pos = {"first": n, "middle": n + new // 2, "last": n + new - 1}[where]
    wrong = (expected[pos - n] + 1) % full.config.vocab_size
    be = scripted(tiny_dir, ids, expected, {pos: wrong})
    client = _client(tiny_dir, served.address, backend=be, max_drafts=4)
    run = client.stream(ids, new, policy=ExitPolicy.always(2), stop_at_eos=False, provisional=True)
    events = list(run)
    client.close()
    tokens = [e.token_id for e in events if e.kind == "token"]
    assert tokens == expected
    assert any(e.kind == "draft" and e.position == pos and e.token_id == wrong for e in events)
    retract = [i for i, e in enumerate(events) if e.kind == "retract"]
    assert len(retract) == 1 and events[retract[0]].position == pos
    assert run.counters.rejected == 1 and run.counters.accepted == new - 1
    after = events[retract[0] + 1]  # the correction comes right after the retraction, from the cloud
    assert after.kind == "token" and after.position == pos and after.origin == "cloud"
    assert after.token_id == expected[pos - n]
    assert be.wrong == {}  # the wrong draft was really made


def test_rollback_across_upload_chunks(tiny_dir):
    """Rows go up in Appends of at most 3 rows and the engine computes at most 2 rows per tick: the first draft
    (after a 30-row prompt spread over 10 Appends) is rejected while more drafts are in flight."""
    full = coexit.load(tiny_dir)
    ids = full.tokenizer.encode(PROMPT, add_bos=True)[:30]
    expected = generate_full(full, ids, 10)
    n = len(ids)
    wrong = {n: (expected[0] + 1) % full.config.vocab_size, n + 5: (expected[5] + 3) % full.config.vocab_size}
    with ServerThread(full, limits=Limits(max_rows_per_append=3, rows_per_tick=2)) as srv:
        be = scripted(tiny_dir, ids, expected, wrong)
        client = _client(tiny_dir, srv.address, backend=be, max_drafts=6)
        gen = client.generate(ids, 10, policy=ExitPolicy.always(3), stop_at_eos=False)
        client.close()
        assert srv.service.manager.sessions == {}  # closed, nothing left behind
    assert gen.tokens == expected
    c = gen.counters
    assert c.rejected >= 1 and c.wasted >= 1  # drafts in later Appends were void when the first was rejected
    assert c.accepted + c.rejected + c.wasted == c.drafts


def test_cloud_restart_mid_verification(tiny_dir):
    full = coexit.load(tiny_dir)
    ids = full.tokenizer.encode(PROMPT, add_bos=True)
    expected = generate_full(full, ids, 30)
    port = free_port()
    proc, _ = start_cloud(tiny_dir, port)
    client = _client(tiny_dir, f"127.0.0.1:{port}", deadline_s=3.0, retry_s=0.2, max_drafts=4)
    run = client.stream(ids, 30, policy=ExitPolicy({2: 0.3, 3: 0.2}), stop_at_eos=False)
    events = []
    try:
        for ev in run:
            events.append(ev)
            if len(events) == 10:  # drafts are in flight: the cloud dies, then comes back
                proc.kill()
                proc.wait()
                proc, _ = start_cloud(tiny_dir, port)
    finally:
        proc.kill()
        proc.wait()
        client.close()
    assert [e.token_id for e in events] == expected
    assert run.counters.sessions_opened == 2
    assert run.counters.uploads[1][:len(ids)] == list(range(len(ids)))  # the new cloud got the context replayed


def test_unverified_tokens_never_emitted_when_the_cloud_is_gone(tiny_dir):
    full = coexit.load(tiny_dir)
    port = free_port()
    proc, _ = start_cloud(tiny_dir, port)
    client = _client(tiny_dir, f"127.0.0.1:{port}", deadline_s=0.5, retry_s=0.1)
    run = client.stream(PROMPT, 40, policy=ExitPolicy.always(2), stop_at_eos=False)
    events = []
    t0 = time.monotonic()
    with pytest.raises(CloudError):
        for ev in run:
            events.append(ev)
            if len(events) == 5:
                proc.kill()
                proc.wait()
    client.close()
    ids = full.tokenizer.encode(PROMPT, add_bos=True)
    assert [e.token_id for e in events] == generate_full(full, ids, len(events))
    assert time.monotonic() - t0 < 30


def test_sampling_matches_the_full_model_distribution(tmp_path):
    """Chi-square: the first token lossless mode emits, over many seeds, against the full model's distribution
    (small vocabulary; exit 1 drafts from a distribution far from the final head's)."""
    from coexit.checkpoint import save
    from coexit.config import Config, EarlyExitConfig
    from coexit.sampling import SamplingParams
    from coexit.tiny import random_model

    cfg = Config(vocab_size=12, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                 early_exit=EarlyExitConfig((1, 2), 2, False, ()))
    d = save(random_model(cfg, 3, std=0.5), tmp_path / "small")
    full = coexit.load(d)
    ids = [1, 5, 7, 3]
    with torch.no_grad():
        p = torch.softmax(full(torch.tensor([ids])).logits[0, -1], -1)
        q = torch.softmax(full(torch.tensor([ids]), exits=[1]).exit_logits[1][0, -1], -1)
    assert float((p - q).abs().sum()) / 2 > 0.2  # the draft distribution really differs
    counts = torch.zeros(cfg.vocab_size)
    n = 600
    with ServerThread(full) as srv:
        client = EdgeClient(TorchBackend.from_checkpoint(d), None, cloud=srv.address, mode="lossless")
        accepted = 0
        for seed in range(n):
            gen = client.generate(ids, 1, SamplingParams(temperature=1.0, seed=seed), policy=ExitPolicy.always(1),
                                  stop_at_eos=False)
            counts[gen.tokens[0]] += 1
            accepted += gen.counters.accepted
        client.close()
    assert 0 < accepted < n  # both branches of the acceptance rule ran
    f_obs, f_exp = _bins(counts, p * n)
    assert chisquare(f_obs, f_exp) > 1e-3
    q_obs, q_exp = _bins(counts, q * n)  # the test has power: the draft distribution itself is rejected
    assert chisquare(q_obs, q_exp) < 1e-3


def chisquare(obs, exp) -> float:
    """Pearson's chi-square test p-value (df = bins - 1) through the regularised upper incomplete gamma."""
    obs, exp = torch.as_tensor(obs, dtype=torch.float64), torch.as_tensor(exp, dtype=torch.float64)
    stat = float(((obs - exp) ** 2 / exp).sum())
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _bins(counts, expected):
    """Observed and expected counts with the tokens expected fewer than 5 times pooled into one bin (merged into
    the last kept bin when the pool itself stays under 5)."""
    keep = expected >= 5
    obs, exp = counts[keep].tolist(), expected[keep].tolist()
    rest_o, rest_e = float(counts[~keep].sum()), float(expected[~keep].sum())
    if rest_e >= 5:
        obs, exp = obs + [rest_o], exp + [rest_e]
    else:
        obs[-1], exp[-1] = obs[-1] + rest_o, exp[-1] + rest_e
    return torch.tensor(obs), torch.tensor(exp)


def test_protocol_refusals(tiny_dir, served):
    full = coexit.load(tiny_dir)
    ch = grpc.insecure_channel(served.address)
    stub = __import__("coexit.v1.coexit_pb2_grpc", fromlist=["CoexitStub"]).CoexitStub(ch)
    info = stub.Info(pb.InfoRequest())
    assert {"verify", "kv_fill"} <= set(info.features)
    row = pb.Tensor(encoding=pb.FP32, rows=2, cols=full.config.hidden_size,
                    data=torch.zeros(2, full.config.hidden_size).numpy().tobytes())

    def session(*msgs):
        reqs = [pb.SessionRequest(open=pb.OpenRequest(fingerprint=full.fingerprint, encoding=pb.FP32)), *msgs]
        return list(stub.Session(iter(reqs)))

    bad = [
        pb.AppendRequest(first_position=0, hidden=row, drafts=[pb.Draft(position=0, token_id=1)]),  # not after a row
        pb.AppendRequest(first_position=0, hidden=row, drafts=[pb.Draft(position=3, token_id=1)]),  # past the rows
        pb.AppendRequest(first_position=0, hidden=row, want_token=True, drafts=[pb.Draft(position=2, token_id=1)]),
        pb.AppendRequest(first_position=0, hidden=row, drafts=[pb.Draft(position=2, token_id=10**6)]),
        pb.AppendRequest(first_position=0, hidden=row, sampling=pb.Sampling(temperature=1.0),
                         drafts=[pb.Draft(position=2, token_id=1, support_ids=[1, 2], support_probs=[0.5])]),
        pb.AppendRequest(first_position=0, hidden=row, fill_rows=[0]),  # an EXACT session
    ]
    for req in bad:
        with pytest.raises(grpc.RpcError) as err:
            session(pb.SessionRequest(append=req))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, req
    with pytest.raises(grpc.RpcError) as err:  # rolling forward
        session(pb.SessionRequest(rollback=pb.RollbackRequest(length=5)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # a rejected draft: the next Append is discarded until a Rollback restores the session
    rows = torch.randn(4, full.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def rows_msg(a, b, **kw):
        t = pb.Tensor(encoding=pb.FP32, rows=b - a, cols=rows.shape[1], data=rows[a:b].numpy().tobytes())
        return pb.SessionRequest(append=pb.AppendRequest(first_position=a, hidden=t, **kw))

    truth = [r.appended.token_id for r in session(rows_msg(0, 2, want_token=True), rows_msg(2, 3, want_token=True),
                                                  rows_msg(3, 4, want_token=True))[1:]]
    wrong = (truth[1] + 1) % full.config.vocab_size
    replies = session(rows_msg(0, 2, drafts=[pb.Draft(position=2, token_id=truth[0])]),
                      rows_msg(2, 3, drafts=[pb.Draft(position=3, token_id=wrong)]),
                      rows_msg(3, 4, want_token=True),  # follows the rejected draft: discarded
                      pb.SessionRequest(rollback=pb.RollbackRequest(length=3)),
                      rows_msg(3, 4, want_token=True))
    a, b, c, rb, d = (r.WhichOneof("msg") and getattr(r, r.WhichOneof("msg")) for r in replies[1:])
    assert [(v.position, v.accepted, v.token_id) for v in a.verdicts] == [(2, True, truth[0])]
    assert [(v.position, v.accepted, v.token_id) for v in b.verdicts] == [(3, False, truth[1])]
    assert c.discarded and not c.has_token and c.layer_tokens == 0
    assert rb.length == 3
    assert not d.discarded and d.has_token and d.token_id == truth[2] and d.layer_tokens > 0
    ch.close()


def test_several_drafts_in_one_append_are_verified_together(tiny_dir):
    """One Append of 6 rows with drafts for its last 3 successors, on an engine that computes 2 rows per tick: the
    drafted rows run together in the last chunk, every verdict is the full model's token at that position, and the
    verdicts stop at the first rejection."""
    full = coexit.load(tiny_dir)
    c = full.config
    rows = torch.randn(6, c.hidden_size, generator=torch.Generator().manual_seed(1))
    with ServerThread(full, limits=Limits(rows_per_tick=2)) as srv:
        stub = __import__("coexit.v1.coexit_pb2_grpc", fromlist=["CoexitStub"]).CoexitStub(
            grpc.insecure_channel(srv.address))

        def run(*appends):
            opening = pb.SessionRequest(open=pb.OpenRequest(fingerprint=full.fingerprint, encoding=pb.FP32))
            return [r.appended for r in list(stub.Session(iter([opening, *appends])))[1:]]

        def append(a, b, **kw):
            t = pb.Tensor(encoding=pb.FP32, rows=b - a, cols=c.hidden_size, data=rows[a:b].numpy().tobytes())
            return pb.SessionRequest(append=pb.AppendRequest(first_position=a, hidden=t, **kw))

        truth = [r.token_id for r in run(*(append(i, i + 1, want_token=True) for i in range(6)))]  # at 1..6
        ok = run(append(0, 6, drafts=[pb.Draft(position=p, token_id=truth[p - 1]) for p in (4, 5, 6)]))[0]
        assert [(v.position, v.accepted, v.token_id) for v in ok.verdicts] == [(p, True, truth[p - 1])
                                                                              for p in (4, 5, 6)]
        bad = (truth[4] + 1) % c.vocab_size
        no = run(append(0, 6, want_token=True, drafts=[pb.Draft(position=4, token_id=truth[3]),
                                                       pb.Draft(position=5, token_id=bad)]))[0]
        assert [(v.position, v.accepted, v.token_id) for v in no.verdicts] == [(4, True, truth[3]),
                                                                              (5, False, truth[4])]
        assert not no.has_token  # the wanted token followed the rejected draft
