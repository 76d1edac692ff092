"""The compression policy (edge/export/sensitivity.py, policy.py, compress.py) on a tiny checkpoint whose matrices
are 128 wide (so llama.cpp's k-quant fallbacks apply, as at d 384) and 256 wide (ffn_down: k-quants fit): the
policy never exceeds its budget as stored, is the exact optimum of its measured damage, and the exported files,
whole and in segments, hold exactly its types and bytes, carry it in their metadata, and load in stock llama.cpp."""

from __future__ import annotations

import itertools
import json
import math

import gguf
import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from edge.apps.compress import main as compress_main  # noqa: E402
from edge.export.cli import main as export_main  # noqa: E402
from edge.export.gguf import export_gguf, stage_tensors  # noqa: E402
from edge.export.policy import META_KEY, BudgetError, Policy, choose  # noqa: E402
from edge.export.quant_types import quantize, stored_type, tensor_bytes  # noqa: E402
from edge.export.segments import export_segments, segment_files  # noqa: E402
from edge.export.sensitivity import SENSITIVITY_FILE, Sensitivity, measure  # noqa: E402
from tests.edge.conftest import NARROW_CONFIG, make_narrow_checkpoint  # noqa: E402

CONFIG = NARROW_CONFIG  # d 128 (k-quants fall back) and 256-wide ffn_down; split at 2: segments [0, 1) and [1, 2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_narrow_checkpoint(tmp_path_factory.mktemp("compress-ckpt"), 5)


@pytest.fixture(scope="module")
def sens(ckpt):
    s = measure(ckpt, [str(ckpt.parent / "calib.txt")], tokens=512, chunk=64, log=lambda m: None)
    s.save(ckpt / SENSITIVITY_FILE)
    return s


def weights(policy):
    return sum(r * c for r, c in policy.shapes.values())


def file_types(path):
    return {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(str(path)).tensors}


def test_sensitivity_covers_every_edge_matrix_at_its_stored_types(sens, tmp_path):
    assert len(sens.tensors) == 2 * 7 and sens.meta["imatrix"] == "imatrix.gguf"
    narrow, wide = sens.tensors["blk.0.attn_q.weight"], sens.tensors["blk.1.ffn_down.weight"]
    assert narrow["shape"] == [128, 128] and wide["shape"] == [128, 256]
    # q4_k/q5_k/q6_k on 128-wide rows are stored as q5_0/q5_1/q8_0: measured once, under the stored name
    assert sorted(narrow["damage"]) == ["f16", "iq4_nl", "q4_0", "q5_0", "q5_1", "q8_0"]
    assert sorted(wide["damage"]) == ["f16", "iq4_nl", "q4_0", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0"]
    d = {t: sens.damage("blk.0.ffn_down.weight", t) for t in ("q4_0", "q5_0", "q8_0", "f16")}
    assert d["q4_0"] > d["q5_0"] > d["q8_0"] > abs(d["f16"]) and d["q8_0"] > 0
    assert set(narrow["damage"]["q4_0"]) == {"exit.1", "exit.2", "final", "split_mse"}
    assert set(sens.tensors["blk.1.attn_q.weight"]["damage"]["q4_0"]) == {"exit.2", "final", "split_mse"}
    assert set(sens.drops) == {"0", "1"} and sens.drops["0"]["final"] > d["q4_0"]
    assert Sensitivity.load(sens.save(tmp_path / "s.json")).tensors == sens.tensors


@pytest.mark.parametrize("budget", [4.5, 4.8, 5.0, 5.3, 5.5, 6.0, 6.2, 7.0, 8.5, 9.0, 16.0])
def test_a_policy_never_exceeds_its_budget_as_stored(sens, budget):
    p = choose(sens, budget)
    assert p.layer_bytes <= math.floor(budget * weights(p) / 8) and p.layer_bpw <= budget
    for name, t in p.types.items():  # only stored types: what llama.cpp writes is what was counted
        assert stored_type(t, p.shapes[name][1]) == t
    assert p.damage == pytest.approx(sum(sens.damage(n, t) for n, t in p.types.items()), abs=1e-8)
    if budget >= 16:  # everything fits: each tensor at its least damaging type
        least = sum(min(sens.damage(n, t) for t in e["damage"]) for n, e in sens.tensors.items())
        assert p.damage == pytest.approx(least, abs=1e-9)


def test_a_budget_below_the_cheapest_storage_is_refused(sens):
    with pytest.raises(BudgetError, match="below what the edge layers can be stored at: 4.50"):
        choose(sens, 4.4)


def test_the_choice_is_the_exact_optimum(sens):
    """Against brute force over every assignment of two types to the 14 matrices (16 384 of them)."""
    types = ("q4_0", "q8_0")
    names = sorted(sens.tensors)
    size = {(n, t): tensor_bytes(t, *sens.tensors[n]["shape"]) for n in names for t in types}
    n_w = sum(r * c for r, c in (sens.tensors[n]["shape"] for n in names))
    for budget in (5.0, 6.0, 7.3):
        cap = math.floor(budget * n_w / 8)
        best = min(sum(sens.damage(n, t) for n, t in zip(names, combo)) for combo in
                   itertools.product(types, repeat=len(names))
                   if sum(size[n, t] for n, t in zip(names, combo)) <= cap)
        assert choose(sens, budget, types=types).damage == pytest.approx(best, abs=1e-9)


@pytest.fixture(scope="module")
def policy(sens, ckpt):
    p = choose(sens, 6.0)
    assert len(set(p.types.values())) >= 3  # a real mix, not a uniform type
    return p


def test_whole_file_holds_the_policy_types_bytes_and_metadata(policy, ckpt, tmp_path):
    from edge.export.imatrix import Imatrix
    from edge.llamacpp.lib import stock_llama

    path = export_gguf(ckpt, policy=policy, out=tmp_path / "edge.gguf")
    r = gguf.GGUFReader(str(path))
    types = {t.name: t for t in r.tensors}
    for name, t in policy.types.items():
        assert types[name].tensor_type.name.lower() == t, name
    assert types["token_embd.weight"].tensor_type.name == "Q8_0" and types["output.weight"].tensor_type.name == "Q8_0"
    blk = [t for t in r.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    assert sum(int(t.n_bytes) for t in blk) == policy.layer_bytes
    assert 8 * sum(int(t.n_bytes) for t in blk) / sum(int(t.n_elements) for t in blk) <= policy.budget_bpw
    f = r.get_field(META_KEY)
    stored = str(bytes(f.parts[f.data[0]]), "utf-8")
    assert stored == policy.to_json() and Policy.from_json(stored) == policy
    assert json.loads(stored)["types"] == policy.types
    # the bytes the sensitivity was measured with are the file's own (llama.cpp's quantizer, with the imatrix)
    fp32, im = stage_tensors(_edge_model(ckpt)), Imatrix.load(ckpt / "imatrix.gguf").values()
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "blk.0.ffn_up.weight"):
        want = quantize(fp32[name], policy.types[name], im[name])
        assert np.array_equal(np.asarray(types[name].data).view(np.uint8).reshape(-1), want.reshape(-1)), name
    llm = stock_llama(path, n_ctx=64, verbose=False, logits_all=True)
    llm.eval([5, 9, 13, 17])
    assert np.isfinite(np.asarray(llm.scores[:4])).all()
    llm.close()


def _edge_model(ckpt):
    from edge.export.gguf import _load_edge

    return _load_edge(ckpt)


def test_segments_hold_the_policy_renumbered(policy, ckpt, tmp_path):
    from edge.llamacpp.lib import stock_llama

    out = export_segments(ckpt, "policy", tmp_path / "seg", policy=policy)
    files = segment_files(out)
    assert [f.name for f in files] == ["layers-00-01.gguf", "layers-01-02.gguf"]
    for lo, f in enumerate(files):
        types = file_types(f)
        want = {n.replace(f"blk.{lo}.", "blk.0."): t for n, t in policy.types.items() if n.startswith(f"blk.{lo}.")}
        assert {n: types[n] for n in want} == want
        assert types["token_embd.weight"] == "q8_0"
        fld = gguf.GGUFReader(str(f)).get_field(META_KEY)
        assert Policy.from_json(str(bytes(fld.parts[fld.data[0]]), "utf-8")) == policy
        llm = stock_llama(f, n_ctx=64, verbose=False)
        assert llm.n_embd() == 128
        llm.close()


def test_compress_and_export_edge_commands(ckpt, tmp_path, capsys):
    from coexit.errors import UsageError

    out = tmp_path / "p.json"
    assert compress_main(["--model", str(ckpt), "--budget-bpw", "5.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "policy 5.5 bpw" in printed and "uniform types" in printed
    p = Policy.load(out)
    assert p == choose(Sensitivity.load(ckpt / SENSITIVITY_FILE), 5.5)
    assert export_main(["--model", str(ckpt), "--policy", str(out), "--out", str(tmp_path / "e.gguf")]) == 0
    assert {n: t for n, t in file_types(tmp_path / "e.gguf").items() if n in p.types} == p.types
    assert export_main(["--model", str(ckpt), "--budget-bpw", "5.5", "--layout", "segments",
                        "--out", str(tmp_path / "s")]) == 0
    assert file_types(tmp_path / "s" / "layers-01-02.gguf")["blk.0.ffn_down.weight"] == p.types["blk.1.ffn_down.weight"]
    with pytest.raises(UsageError, match="drop --quant"):
        export_main(["--model", str(ckpt), "--policy", str(out), "--quant", "q8_0"])
    with pytest.raises(UsageError, match="below what the edge layers can be stored at"):
        compress_main(["--model", str(ckpt), "--budget-bpw", "3"])


def test_learned_rounding_covers_whole_files_and_segments_alike(policy, ckpt, tmp_path, capsys):
    """--learned-rounding: the tuned codes stay on the policy's types, differ from llama.cpp's own codes, and each
    segment holds exactly the whole file's tuned blocks (renumbered); the metadata records the rounding."""
    calib = str(ckpt.parent / "calib.txt")
    pfile = policy.save(tmp_path / "p.json")
    base = ["--model", str(ckpt), "--policy", str(pfile), "--learned-rounding", "12", "--calib", calib,
            "--calib-tokens", "2048"]
    assert export_main(base + ["--out", str(tmp_path / "r.gguf")]) == 0
    assert "about" in capsys.readouterr().err  # the time estimate comes before the steps
    assert export_main(base + ["--layout", "segments", "--out", str(tmp_path / "seg")]) == 0
    plain = export_gguf(ckpt, policy=policy, out=tmp_path / "plain.gguf")
    tuned = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "r.gguf")).tensors}
    untuned = {t.name: t for t in gguf.GGUFReader(str(plain)).tensors}
    assert {n: tuned[n].tensor_type.name.lower() for n in policy.types} == policy.types
    changed = [n for n in policy.types if not np.array_equal(np.asarray(tuned[n].data), np.asarray(untuned[n].data))]
    assert len(changed) >= len(policy.types) // 2
    fld = gguf.GGUFReader(str(tmp_path / "r.gguf")).get_field("coexit.learned_rounding")
    assert str(bytes(fld.parts[fld.data[0]]), "utf-8").startswith("12 steps")
    for lo, f in enumerate(segment_files(tmp_path / "seg")):
        for t in gguf.GGUFReader(str(f)).tensors:
            if t.name.startswith("blk."):
                i, rest = t.name[4:].split(".", 1)
                assert np.array_equal(np.asarray(t.data), np.asarray(tuned[f"blk.{int(i) + lo}.{rest}"].data)), t.name
        assert np.array_equal(np.asarray(next(t for t in gguf.GGUFReader(str(f)).tensors
                                              if t.name == "token_embd.weight").data),
                              np.asarray(tuned["token_embd.weight"].data))
    from edge.llamacpp.lib import stock_llama

    llm = stock_llama(tmp_path / "r.gguf", n_ctx=64, verbose=False)
    llm.eval([5, 9, 13])
    llm.close()


def test_the_shipped_sensitivity_belongs_to_the_bundled_model():
    from pathlib import Path

    from coexit.checkpoint import fingerprint

    model = Path(__file__).resolve().parents[2] / "models" / "coexit-code-small"
    sens = Sensitivity.load(model / SENSITIVITY_FILE)
    assert sens.fingerprint == fingerprint(model) and len(sens.tensors) == 4 * 7
    assert sens.meta["text"] == ["data/corpus/train.jsonl"]  # calibration text, never the held-out file
    for budget in (4.5, 5.0, 5.5, 6.0, 6.2, 7.0):
        p = choose(sens, budget)
        assert p.layer_bpw <= budget and p.layer_bytes <= math.floor(budget * weights(p) / 8)
        for name, t in p.types.items():  # at d 384 only ffn_down (1024 wide) can hold a k-quant
            assert t in (("q4_k", "q5_k", "q6_k") if "ffn_down" in name else ()) + ("iq4_nl", "q4_0", "q5_0",
                                                                                       "q5_1", "q8_0", "f16")
        b = choose(sens, budget, backend="bnb")  # the bitsandbytes types, measured too
        assert b.layer_bpw <= budget and set(b.types.values()) <= {"bnb-nf4", "bnb-int8"}


def test_the_gguf_backend_runs_a_policy_file(policy, ckpt, tmp_path):
    """make_backend("gguf", DIR, quant=POLICY.json) (`coexit generate --backend gguf --quant POLICY.json`): exported
    once as DIR/edge-policy-Bbpw.*, reused while the file holds that policy, exported again when it changes."""
    from edge.backends import make_backend

    pfile = policy.save(tmp_path / "p.json")
    be = make_backend("gguf", ckpt, quant=str(pfile), layout="whole")
    path = ckpt / f"edge-policy-{policy.budget_bpw:g}bpw.gguf"
    assert {n: t for n, t in file_types(path).items() if n in policy.types} == policy.types
    r = be.step([5, 9, 13], 0, None)
    assert np.isfinite(r.exit_logits[CONFIG.split_layer].numpy()).all()
    be.close()
    stamp = path.stat().st_mtime_ns
    make_backend("gguf", ckpt, quant=str(pfile), layout="whole").close()
    assert path.stat().st_mtime_ns == stamp  # reused
    other = Policy.from_json(policy.to_json())
    other.types["blk.0.attn_q.weight"] = "q8_0" if policy.types["blk.0.attn_q.weight"] != "q8_0" else "q4_0"
    make_backend("gguf", ckpt, quant=str(other.save(tmp_path / "o.json")), layout="whole").close()
    assert file_types(path)["blk.0.attn_q.weight"] == other.types["blk.0.attn_q.weight"]


def test_a_bitsandbytes_policy_is_measured_with_the_backends_modules_and_applied_by_it(sens, ckpt):
    """--backend bnb: bnb-nf4 / bnb-int8 per matrix, measured by swapping in the backend's own modules, kept in the
    same file as llama.cpp's types without changing their policies, and loaded by the bnb backend as chosen."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    from edge.backends.bnb import BnbBackend, rounders

    bnb = measure(ckpt, [str(ckpt.parent / "calib.txt")], tokens=512, chunk=64, rounders=rounders(), drops=False,
                  log=lambda m: None)
    assert sorted(bnb.tensors["blk.0.attn_q.weight"]["damage"]) == ["bnb-int8", "bnb-nf4"]
    assert bnb.damage("blk.0.ffn_down.weight", "bnb-nf4") > bnb.damage("blk.0.ffn_down.weight", "bnb-int8") > 0
    both = Sensitivity.load(sens.save(ckpt.parent / "both.json")).merge(bnb)
    assert choose(both, 6.0) == choose(sens, 6.0)  # llama.cpp's policy ignores the bitsandbytes types
    assert set(choose(both, 4.5, backend="bnb").types.values()) == {"bnb-nf4"}
    p = choose(both, 6.5, backend="bnb")
    assert set(p.types.values()) == {"bnb-nf4", "bnb-int8"} and p.layer_bpw <= 6.5 and p.backend == "bnb"
    assert p.heads == dict.fromkeys(("token_embd.weight", "output.weight"), "f32")
    be = BnbBackend.from_checkpoint(ckpt, policy=p)
    stored = 0
    for name, t in p.types.items():
        _, i, kind, _ = name.split(".")
        sub = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}[kind]
        mod = be.model.model.layers[i].get_submodule(sub)
        assert type(mod) is (Linear4bit if t == "bnb-nf4" else Linear8bitLt), name
        w = mod.weight
        stored += w.numel() * w.element_size() + (w.quant_state.absmax.numel() * 4 if t == "bnb-nf4" else
                                                  w.SCB.numel() * 4)
    assert stored == p.layer_bytes  # the bytes the budget counted are the ones the backend holds
    r = be.step([5, 9, 13], 0, None)
    assert np.isfinite(r.exit_logits[CONFIG.split_layer].numpy()).all()
    with pytest.raises(ValueError, match="for the bnb backend"):
        export_gguf(ckpt, policy=p, out=ckpt.parent / "no.gguf")
