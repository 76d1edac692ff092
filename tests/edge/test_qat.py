"""Quantization-aware fine-tuning of the edge (edge/export/qat.py, `coexit export-edge --qat`) on a tiny checkpoint
whose matrices are 128 wide (k-quants fall back, as at d 384) and 256 wide (ffn_down: k-quants fit): the fake
quantization the training sees is bit for bit what llama.cpp's quantizer writes into the exported file for every
type a policy can pick, the gradient passes straight through, fine-tuning lowers the exit heads' KL to fp32 below
plain quantization's, and the command writes the policy's types in both layouts with the tuning recorded."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp")

from coexit.errors import UsageError  # noqa: E402
from edge.export.cli import main as export_main  # noqa: E402
from edge.export.gguf import _load_edge, export_gguf, permute_qk  # noqa: E402
from edge.export.imatrix import LINEAR_NAMES, Imatrix  # noqa: E402
from edge.export.policy import Policy  # noqa: E402
from edge.export.qat import FakeQuant, qat_weights  # noqa: E402
from edge.export.quant_types import fake_quantize  # noqa: E402
from edge.export.rounding import calibration  # noqa: E402
from edge.export.segments import segment_files  # noqa: E402
from tests.edge.conftest import NARROW_CONFIG, make_narrow_checkpoint  # noqa: E402

CONFIG = NARROW_CONFIG
KINDS = list(LINEAR_NAMES.values())  # attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down
# every stored type a policy picks at these widths (k-quants only on the 256-wide ffn_down), across two policies
NARROW = ["q4_0", "iq4_nl", "q5_0", "q5_1", "q8_0", "f16"]
WIDE = {"a": ["q4_k", "q6_k"], "b": ["q5_k", "iq4_nl"]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_narrow_checkpoint(tmp_path_factory.mktemp("qat-ckpt"), 7)


def hand_policy(ckpt, variant: str = "a", uniform: str | None = None) -> Policy:
    model = _load_edge(ckpt)
    types, shapes = {}, {}
    for i in range(CONFIG.split_layer):
        for k, kind in enumerate(KINDS):
            name = f"blk.{i}.{kind}.weight"
            shapes[name] = list(model.model.layers[str(i)].get_submodule(
                next(s for s, v in LINEAR_NAMES.items() if v == kind)).weight.shape)
            t = WIDE[variant][i] if kind == "ffn_down" else NARROW[(k + 3 * i + (variant == "b")) % len(NARROW)]
            types[name] = uniform or t
    return Policy(model.fingerprint, 6.0, types, shapes, imatrix="imatrix.gguf")


def _dequant(t) -> np.ndarray:
    rows, cols = int(t.shape[1]), int(t.shape[0])
    return np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), np.float32).reshape(rows, cols)


@pytest.mark.parametrize("variant", ["a", "b"])
def test_the_fake_quantization_is_the_exported_files_dequantized_tensor_bit_for_bit(ckpt, tmp_path, variant):
    policy = hand_policy(ckpt, variant)
    assert {t for t in policy.types.values()} >= set(NARROW) | set(WIDE[variant]) - {"iq4_nl"}
    model = _load_edge(ckpt)
    g = torch.Generator().manual_seed(3)
    tuned = {}  # weights as a fine-tuning run leaves them: moved off the fp32 checkpoint
    for name, p in model.named_parameters():
        if name.startswith("model.layers.") and p.dim() == 2:
            tuned[name] = p.detach() + 0.01 * torch.randn(p.shape, generator=g)
        elif "norm" in name:
            tuned[name] = p.detach() * (1 + 0.05 * torch.randn(p.shape, generator=g))
    path = export_gguf(ckpt, policy=policy, out=tmp_path / "e.gguf", weights=tuned)
    r = gguf.GGUFReader(str(path))
    file = {t.name: t for t in r.tensors}
    im = Imatrix.load(ckpt / "imatrix.gguf").values()
    heads = {"attn_q": CONFIG.num_attention_heads, "attn_k": CONFIG.num_key_value_heads}
    for i in range(CONFIG.split_layer):
        for sub, kind in LINEAR_NAMES.items():
            name = f"blk.{i}.{kind}.weight"
            assert file[name].tensor_type.name.lower() == policy.types[name], name
            fq = FakeQuant(policy.types[name], im[name])
            w = tuned[f"model.layers.{i}.{sub}.weight"]
            want = fq(w).detach().numpy()
            if kind in heads:
                want = permute_qk(want, heads[kind])
            assert np.array_equal(_dequant(file[name]), want), name
            assert np.array_equal(want, permute_qk(fake_quantize(w.numpy(), policy.types[name], im[name]),
                                                   heads[kind]) if kind in heads else
                                  fake_quantize(w.numpy(), policy.types[name], im[name]))
        assert np.array_equal(np.asarray(file[f"blk.{i}.attn_norm.weight"].data),
                              tuned[f"model.layers.{i}.input_layernorm.weight"].numpy())
    assert np.array_equal(np.asarray(file["output_norm.weight"].data), tuned["exits.2.norm.weight"].numpy())
    f = r.get_field("coexit.exit_norm.1")
    assert np.array_equal(np.array([f.parts[j][0] for j in f.data], np.float32), tuned["exits.1.norm.weight"].numpy())


def test_the_gradient_passes_straight_through():
    w = torch.randn(8, 64, requires_grad=True)
    fq = FakeQuant("q4_0", None)
    out = fq(w)
    assert np.array_equal(out.detach().numpy(), fake_quantize(w.detach().numpy(), "q4_0"))
    assert not torch.equal(out, w)
    (out * torch.arange(64.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(64.0).expand(8, 64))


def test_fine_tuning_lowers_the_exit_kl_below_plain_quantization(ckpt):
    policy = hand_policy(ckpt, uniform="q4_0")
    calib = calibration(ckpt, [str(ckpt.parent / "calib.txt")], tokens=4096, seq=64)
    weights, info = qat_weights(ckpt, policy, calib, 30, lr=1e-3, log=lambda m: None)
    before = sum(v for k, v in info["before"].items() if k.startswith("exit."))
    after = sum(v for k, v in info["after"].items() if k.startswith("exit."))
    assert set(info["before"]) == {"exit.1", "exit.2", "split_mse"}
    assert after < 0.8 * before, (before, after)
    assert info["after"]["split_mse"] < info["before"]["split_mse"]
    fp32 = dict(_load_edge(ckpt).named_parameters())
    assert all(not torch.equal(w, fp32[n]) for n, w in weights.items())  # every tensor tuned (norms too)
    assert sum(n.endswith("norm.weight") for n in weights) == 2 * CONFIG.split_layer + 2


def test_export_edge_qat_writes_the_policy_in_both_layouts(ckpt, tmp_path, capsys):
    policy = hand_policy(ckpt)
    pfile = policy.save(tmp_path / "p.json")
    calib = str(ckpt.parent / "calib.txt")
    base = ["--model", str(ckpt), "--policy", str(pfile), "--qat", "3", "--calib", calib, "--calib-tokens", "2048"]
    assert export_main(base + ["--out", str(tmp_path / "q.gguf")]) == 0
    err = capsys.readouterr().err
    assert "about" in err and "exit.1" in err  # the time estimate, then the loss before -> after
    assert export_main(base + ["--layout", "segments", "--out", str(tmp_path / "seg")]) == 0
    plain = {t.name: t for t in gguf.GGUFReader(str(export_gguf(ckpt, policy=policy, out=tmp_path / "p.gguf"))).tensors}
    r = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    tuned = {t.name: t for t in r.tensors}
    assert {n: tuned[n].tensor_type.name.lower() for n in policy.types} == policy.types
    assert sum(not np.array_equal(np.asarray(tuned[n].data), np.asarray(plain[n].data)) for n in policy.types) >= 10
    fld = r.get_field("coexit.qat")
    assert str(bytes(fld.parts[fld.data[0]]), "utf-8").startswith("3 steps")
    for lo, f in enumerate(segment_files(tmp_path / "seg")):
        types = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(str(f)).tensors}
        want = {n.replace(f"blk.{lo}.", "blk.0."): t for n, t in policy.types.items() if n.startswith(f"blk.{lo}.")}
        assert {n: types[n] for n in want} == want
    from edge.llamacpp.lib import stock_llama

    llm = stock_llama(tmp_path / "q.gguf", n_ctx=64, verbose=False)
    llm.eval([5, 9, 13])
    llm.close()
    with pytest.raises(UsageError):
        export_main(["--model", str(ckpt), "--quant", "q4_0", "--qat", "3", "--calib", calib])


def test_export_edge_qat_draws_enough_calibration_for_its_steps(ckpt, tmp_path, monkeypatch):
    import edge.export.qat as qat

    seen = []
    monkeypatch.setattr(qat, "export_qat", lambda *a, tokens, **kw: seen.append(tokens) or tmp_path / "q.gguf")
    pfile = str(hand_policy(ckpt).save(tmp_path / "p.json"))
    base = ["--model", str(ckpt), "--policy", pfile, "--calib", str(ckpt.parent / "calib.txt"), "--out",
            str(tmp_path / "q.gguf")]
    for extra in (["--qat", "500"], ["--qat", "20"], ["--qat", "500", "--calib-tokens", "2048"]):
        assert export_main(base + extra) == 0
    assert seen == [500 * 4 * 256, 65536, 2048]  # a sequence for each of the steps' 4 x 256-token draws
