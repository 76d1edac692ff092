"""The llama.cpp edge as GGUF segments (edge/export/segments.py): stock files, exits that skip the layers above
them, and KV caught up later, with the same split rows and exit logits as coexit's torch edge."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from edge.backends import make_backend
from edge.export.segments import segment_bounds, segment_files

# quant_dir (tests/edge/conftest.py): 4 layers, exits 1, 2, 3 with the split at 3, each exit its own projection


@pytest.fixture(scope="module")
def segments(quant_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg") / "edge-f32.segments"
    return make_backend("gguf", quant_dir, quant="f32", kv_type="f32", layout="segments", out=out)


def test_segments_are_stock_llama_files(segments, quant_dir):
    from edge.llamacpp.lib import stock_llama

    files = segment_files(segments.path)
    assert [f.name for f in files] == ["layers-00-01.gguf", "layers-01-02.gguf", "layers-02-03.gguf"]
    assert segment_bounds([1, 2, 3], 3) == [(0, 1), (1, 2), (2, 3)]
    for f in files:
        r = gguf.GGUFReader(str(f))
        assert int(r.get_field("llama.block_count").parts[-1][0]) == 1
        assert {t.name for t in r.tensors} >= {"token_embd.weight", "blk.0.attn_q.weight", "output.weight"}
        assert not any(t.name.startswith("blk.1.") for t in r.tensors)
        llm = stock_llama(f, n_ctx=64, verbose=False)  # the stock loader, not coexit's session code
        assert llm.n_embd() == 256
        llm.close()


def _scripted(plan: dict[int, int]):
    """decide: accept exit plan[position] (no entry: never exit)."""
    state = {"pos": 0}

    def decide(e, logits, hidden):
        return plan.get(state["pos"]) == e

    return state, decide


def test_exit_skips_layers_and_kv_catches_up(segments, quant_dir):
    torch_be = make_backend("torch", quant_dir)
    prompt = [5, 9, 13, 17, 21, 25]
    plan = {6: 1, 7: 2, 8: 1, 9: 3, 10: 1, 11: 1}  # position -> accepted exit; 12, 13 never exit
    depths, counted = {}, {}
    for be in (segments, torch_be):
        be.reset()
        be.step(prompt, 0, None)
        state, decide = _scripted(plan)
        depths[be.name], counted[be.name] = [], []
        tok = 30
        for pos in range(6, 14):
            state["pos"] = pos
            before = be.layer_tokens
            r = be.step([tok], pos, decide)
            depths[be.name].append(r.depth)
            counted[be.name].append(be.layer_tokens - before)
            tok = int(r.exit_logits[r.depth].argmax())
            if r.exited and r.depth < 3:  # the layers above the exit did not run
                assert max(r.exit_logits) == r.depth
    assert depths["llama.cpp"] == depths["torch"] == [1, 2, 1, 3, 1, 1, 3, 3]
    # layer-row counts: an exit at 1 runs 1 layer; a deeper token first catches up the rows parked below it, e.g.
    # position 9: layer 0 for itself, layer 1 for rows 8-9, layer 2 for rows 6-9 (6, 7 parked at depth 2)
    assert counted["llama.cpp"] == counted["torch"] == [1, 1 + 2, 1, 1 + 2 + 4, 1, 1, 1 + 3 + 3, 3]


def test_segment_rows_and_logits_match_torch(segments, quant_dir):
    torch_be = make_backend("torch", quant_dir)
    ids = [int(x) for x in torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(0))]
    out = {}
    for be in (segments, torch_be):
        be.reset()
        be.step(ids[:8], 0, None)
        logits = []
        for pos in range(8, 40):
            r = be.step([ids[pos]], pos, lambda e, lg, h, p=pos: e == 1 + p % 3 and p % 4)
            logits.append(r.exit_logits[r.depth])
        be.step([7], 40, None)  # one deep token releases every parked row
        first, rows = be.take_split_rows()
        out[be.name] = (first, rows, torch.stack(logits))
    (fa, ra, la), (fb, rb, lb) = out["llama.cpp"], out["torch"]
    assert fa == fb == 0 and ra.shape == rb.shape == (41, 256)
    torch.testing.assert_close(ra, rb, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(la, lb, rtol=2e-3, atol=2e-3)


def test_truncate_inside_parked_rows(segments):
    segments.reset()
    segments.step([4, 5, 6, 7], 0, None)
    for pos in range(4, 10):  # every token stops at exit 1: rows park below layer 1's top
        segments.step([8 + pos], pos, lambda e, lg, h: e == 1)
    segments.truncate(6)  # drop positions 6..9, parked at depth 1, and their KV in segment 0
    segments.step([40, 41], 6, None)
    first, rows = segments.take_split_rows()
    fresh = segments.__class__(segments.path, kv_type="f32")
    fresh.step([4, 5, 6, 7, 12, 13, 40, 41], 0, None)
    _, expect = fresh.take_split_rows()
    assert first == 0 and rows.shape == expect.shape == (8, 256)
    np.testing.assert_allclose(rows.numpy(), expect.numpy(), rtol=1e-4, atol=1e-4)
    fresh.close()


def test_a_quant_mix_follows_the_layer_renumbering(quant_dir, tmp_path):
    from edge.export.segments import export_segments

    out = export_segments(quant_dir, "q4-mix", tmp_path / "seg", imatrix="none")
    types = []
    for f in segment_files(out):
        r = gguf.GGUFReader(str(f))
        types.append({t.name: t.tensor_type.name for t in r.tensors})
    kept = [t["blk.0.attn_q.weight"] == t["blk.0.ffn_down.weight"] == "Q8_0" for t in types]
    assert kept == [True, False, False]  # the model's layer 0 only, though every segment has a blk.0
    assert {t["token_embd.weight"] for t in types} == {"Q8_0"}


def test_whole_file_applies_an_inner_head_only_when_read(quant_dir, tmp_path):
    """The whole layout computes an inner exit's Python head only where a decide() looks, or when its logits are
    read (as the torch backend does): a prompt chunk or a standalone step pays no head nobody reads."""
    whole = make_backend("gguf", quant_dir, quant="f32", kv_type="f32", layout="whole", out=tmp_path / "e.gguf")
    torch_be = make_backend("torch", quant_dir)
    ids = [5, 9, 14, 3, 22, 7]
    calls = []
    head = whole.stages[0].heads[1]
    whole.stages[0].heads[1] = lambda h: calls.append(h.shape) or head(h)
    for be in (whole, torch_be):
        be.reset()
        be.step(ids, 0, None)
    r = whole.step([8], 6, None)
    assert calls == [] and not r.exit_logits.is_computed(1) and not r.exit_logits.is_computed(2)
    ref = torch_be.step([8], 6, None).exit_logits
    for e in (1, 2, 3):
        torch.testing.assert_close(r.exit_logits[e], ref[e], rtol=2e-3, atol=2e-3)
    assert len(calls) == 1  # exit 1's head, once, on the newest row
    r = whole.step([4], 7, lambda e, lg, h: False)  # a decide that looks everywhere gets every inner head
    assert r.exit_logits.is_computed(1) and r.exit_logits.is_computed(2) and len(calls) == 2
    whole.close()
