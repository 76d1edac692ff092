"""The torch edge backend's decode step applies an exit head only where the policy checks one (or where someone
reads its logits), each at most once, on the newest row; and its logits are those of the full model."""

from __future__ import annotations

import pytest
import torch

import coexit
from coexit.attention import attend
from coexit.kv_cache import KVCache
from edge.backends import TorchBackend

PROMPT = [5, 9, 14, 3, 22, 7, 11, 30, 4, 17]


@pytest.fixture()
def edge(split_dir):
    """(backend, full model, head calls) for a split-4 checkpoint with edge exits 2, 3, 4 (shared LM head)."""
    d = split_dir(4)
    backend = TorchBackend.from_checkpoint(d)
    calls: list[tuple[str, int]] = []  # (module, rows) for every exit norm and LM head application
    m = backend.model
    assert m.config.early_exit.share_lm_head and backend.exit_layers == [2, 3, 4]
    for e, head in m.exits.items():
        head.norm.register_forward_hook(lambda _m, args, _out, e=e: calls.append((f"norm{e}", args[0].numel())))
    m.lm_head.register_forward_hook(lambda _m, args, _out: calls.append(("lm_head", args[0].numel())))
    return backend, coexit.load(d), calls


def reference(full, ids: list[int]) -> dict[int, torch.Tensor]:
    """Exit logits (V,) of the last position, from one uncached full-model forward."""
    with torch.no_grad():
        out = full(torch.tensor([ids]), exits="all")
    return {e: lg[0, -1] for e, lg in out.exit_logits.items()}


def test_accepting_at_the_first_exit_computes_no_other_head(edge):
    backend, full, calls = edge
    backend.step(PROMPT, 0, None)
    calls.clear()
    seen = []
    res = backend.step([8], len(PROMPT), lambda e, lg, h: seen.append(e) or e == 2)
    assert res.exited and res.depth == 2 and seen == [2]
    hidden = full.config.hidden_size
    assert calls == [("norm2", hidden), ("lm_head", hidden)]  # one head, on one row
    assert list(res.exit_logits) == [2]
    torch.testing.assert_close(res.exit_logits[2], reference(full, PROMPT + [8])[2], atol=1e-5, rtol=0)
    assert len(calls) == 2  # reading the logits the decide saw computes nothing again


def test_never_exit_evaluates_each_checked_exit_once(edge):
    backend, full, calls = edge
    backend.step(PROMPT, 0, None)
    ids = list(PROMPT)
    for tok in (8, 19, 2):
        calls.clear()
        res = backend.step([tok], len(ids), lambda e, lg, h: False)
        ids.append(tok)
        assert not res.exited and res.depth == 4
        assert [c for c, _ in calls] == ["norm2", "lm_head", "norm3", "lm_head", "norm4", "lm_head"]
        assert all(rows == full.config.hidden_size for _, rows in calls)  # the newest row only
        ref = reference(full, ids)
        for e in (2, 3, 4):
            torch.testing.assert_close(res.exit_logits[e], ref[e], atol=1e-5, rtol=0)
        assert len(calls) == 6
        backend.take_split_rows()


def test_without_decide_heads_are_applied_only_when_read(edge):
    backend, full, calls = edge
    res = backend.step(PROMPT, 0, None)  # a prompt chunk: nobody reads its exit logits
    assert calls == []
    assert list(res.exit_logits) == [2, 3, 4] and not any(res.exit_logits.is_computed(e) for e in (2, 3, 4))
    res = backend.step([8], len(PROMPT), None)
    assert calls == []
    assert max(res.exit_logits) == 4 and calls == []  # the keys alone compute nothing
    split = res.exit_logits[4]
    assert [c for c, _ in calls] == ["norm4", "lm_head"]
    assert res.exit_logits[4] is split and len(calls) == 2  # computed once
    ref = reference(full, PROMPT + [8])
    torch.testing.assert_close(split, ref[4], atol=1e-5, rtol=0)
    torch.testing.assert_close(res.exit_logits[2], ref[2], atol=1e-5, rtol=0)
    assert [c for c, _ in calls] == ["norm4", "lm_head", "norm2", "lm_head"]
    res.exit_logits[3] = torch.zeros(3)  # callers may still overwrite an entry
    assert res.exit_logits[3].shape == (3,) and len(calls) == 4


def test_lean_step_logits_are_bit_identical_to_the_general_path(edge, monkeypatch):
    """The decode step (no attention mask, RoPE rows from the table) against the same steps through the masked
    attention and freshly computed RoPE (explicit positions)."""
    backend, _, _ = edge
    never = lambda e, lg, h: False  # noqa: E731
    backend.step(PROMPT, 0, None)
    lean = [backend.step([t], len(PROMPT) + i, never) for i, t in enumerate([8, 19, 2])]

    def masked_attend(cache, layer, q, k, v, positions):
        k, v = cache.update(layer, k, v)
        return attend(q, k, v, positions, torch.arange(k.shape[2])[None].expand(q.shape[0], -1))

    monkeypatch.setattr(KVCache, "attend", masked_attend)
    m = backend.model
    cache = m.new_cache()
    ids = PROMPT + [8, 19, 2]
    with torch.no_grad():
        h = m.embed(torch.tensor([ids]))
        m.run_layers(h[:, :len(PROMPT)], torch.arange(len(PROMPT)), cache, 0, 4)
        for i, res in enumerate(lean):
            p = len(PROMPT) + i
            x = h[:, p:p + 1]
            for a, b in ((0, 2), (2, 3), (3, 4)):  # the spans the runner computes (an exit after each)
                x = m.run_layers(x, torch.tensor([p]), cache, a, b).hidden
                assert torch.equal(res.exit_logits[b], m.head_logits(b, x[0, -1]))


def test_rotary_table_matches_forward_and_follows_a_new_inv_freq(tiny_dir):
    m = coexit.load(tiny_dir)
    pos, cos, sin = m.rotary.span(300, 5, torch.float32)  # beyond the first table: it grows
    c2, s2 = m.rotary(torch.arange(300, 305)[None], torch.float32)
    assert pos.tolist() == [list(range(300, 305))] and torch.equal(cos, c2) and torch.equal(sin, s2)
    m.rotary.inv_freq = m.rotary.inv_freq * 0.5
    _, cos3, _ = m.rotary.span(300, 5, torch.float32)
    assert torch.equal(cos3, m.rotary(torch.arange(300, 305)[None], torch.float32)[0])
    assert not torch.equal(cos3, cos)


def test_a_policy_pays_only_for_the_exits_it_checks(edge):
    from coexit.exits import ExitPolicy

    backend, full, calls = edge
    backend.step(PROMPT, 0, None)
    calls.clear()
    policy = ExitPolicy({3: 2.0})  # checks exit 3 only (max-prob never reaches 2: never taken)
    res = backend.step([8], len(PROMPT), policy.decide)
    assert not res.exited and res.depth == 4
    hidden = full.config.hidden_size
    assert calls == [("norm3", hidden), ("lm_head", hidden)]  # exits 2 and 4 apply no head...
    ref = reference(full, PROMPT + [8])
    torch.testing.assert_close(res.exit_logits[4], ref[4], atol=1e-5, rtol=0)  # ...until their logits are read
    assert calls[2:] == [("norm4", hidden), ("lm_head", hidden)]


def test_standalone_checks_only_exits_below_the_split_that_can_stop(edge):
    """Standalone mode emits at the split whatever a decision there says: a gate policy thresholded only at the
    split checks no exit at all (not even the earlier exits its gate reads), and runs straight to the split."""
    from coexit.exits import Below
    from edge.policy.gate import ExitGate, GatePolicy

    backend, full, calls = edge
    gate = ExitGate([1.0] * 7, 0.0, [0.0] * 7, [1.0] * 7)
    split_only = GatePolicy({4: 0.5}, "learned", gates={2: gate, 3: gate, 4: gate})
    assert [e for e in (2, 3, 4) if split_only.checks(e)] == [2, 3, 4]  # collaborative: 4's gate reads 2 and 3
    view = Below(split_only, 4)
    assert [e for e in (2, 3, 4) if view.checks(e)] == [] and view.may_stop() == set()
    backend.step(PROMPT, 0, None)
    calls.clear()
    res = backend.step([8], len(PROMPT), view.decide)
    assert not res.exited and res.depth == 4 and calls == []
    torch.testing.assert_close(res.exit_logits[4], reference(full, PROMPT + [8])[4], atol=1e-5, rtol=0)
    inner = Below(GatePolicy({3: 0.5, 4: 0.5}, "learned", gates={2: gate, 3: gate, 4: gate}), 4)
    assert [e for e in (2, 3, 4) if inner.checks(e)] == [2, 3] and inner.may_stop() == {3}


def test_gguf_layout_follows_what_the_policy_can_stop_at(split_dir):
    from coexit.exits import ExitPolicy
    from edge.backends.registry import gguf_layout
    from edge.policy.adaptive import AdaptivePolicy, FrontierPoint
    from edge.policy.gate import ExitGate, GatePolicy

    d = split_dir(4)  # edge exits 2, 3, 4; split 4
    gate = ExitGate([1.0] * 7, 0.0, [0.0] * 7, [1.0] * 7)
    split_gate = GatePolicy({4: 0.5}, "learned", gates={2: gate, 4: gate})
    cases = [(None, "collaborative", "whole"), (ExitPolicy.never(), "standalone", "whole"),
             (ExitPolicy({4: 0.9}), "collaborative", "whole"), (ExitPolicy({2: 0.9}), "standalone", "segments"),
             (split_gate, "collaborative", "segments"),  # its gate at 4 reads exit 2: llama.cpp's head is cheaper
             (split_gate, "standalone", "whole")]
    for policy, mode, want in cases:
        assert gguf_layout(policy, mode, d) == want, (policy, mode)
    points = [FrontierPoint({4: 0.9}, {4: 0.3}, 0.0), FrontierPoint({2: 0.9, 4: 0.5}, {2: 0.2, 4: 0.4}, 0.01)]
    adaptive = AdaptivePolicy({}, "max_prob", points=points, budget=0.02, split=4)
    assert gguf_layout(adaptive, "collaborative", d) == "segments"  # exit 2 is in an admissible setting
    adaptive.budget = 0.0
    adaptive.__post_init__()
    assert gguf_layout(adaptive, "collaborative", d) == "whole"
