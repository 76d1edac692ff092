"""Quant mixes and the importance matrix (edge/export/gguf.py, edge/export/imatrix.py) on a small random checkpoint.

The checkpoint is conftest's quantization-friendly one with its RMSNorm weights given a heavy-tailed spread
across channels (log-normal, sigma 1), as trained models have: some input columns of every matrix then carry far
larger activations than others, which is what an importance matrix is for. (With the plain random checkpoint
all columns look alike and an imatrix has nothing to tell the quantizer.)
"""

from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
import torch

from coexit.checkpoint import fingerprint, load, save
from coexit.tiny import SAMPLE_TEXT, random_model, train_bpe
from coexit.tokenizer import Tokenizer

pytest.importorskip("llama_cpp")

from edge.backends.llamacpp import LlamaCppBackend  # noqa: E402
from edge.backends.torch_backend import TorchBackend  # noqa: E402
from edge.export.cli import main as export_main  # noqa: E402
from edge.export.gguf import IMATRIX_FILE, export_gguf  # noqa: E402
from edge.export.imatrix import Imatrix, collect  # noqa: E402
from edge.export.imatrix import main as imatrix_main  # noqa: E402
from tests.edge.conftest import QUANT_CONFIG, QUANT_STD  # noqa: E402

TEXT = "".join(SAMPLE_TEXT) * 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = random_model(QUANT_CONFIG, 3, std=QUANT_STD)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.mul_(torch.exp(torch.randn(p.shape, generator=gen)))
    return save(model, tmp_path_factory.mktemp("mix-ckpt"), tokenizer=train_bpe(SAMPLE_TEXT * 4, 512))


@pytest.fixture(scope="module")
def ids(ckpt):
    return Tokenizer.from_file(ckpt / "tokenizer.json").encode(TEXT)[:120]


@pytest.fixture(scope="module")
def imatrix_path(ckpt, tmp_path_factory):
    text = tmp_path_factory.mktemp("calib") / "calib.txt"
    text.write_text(TEXT)
    out = tmp_path_factory.mktemp("im") / "imatrix.gguf"
    assert imatrix_main(["--model", str(ckpt), "--text", str(text), "--tokens", "400", "--chunk", "64",
                         "--out", str(out)]) == 0
    return out


def types_of(path):
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def meta(path, key):
    f = gguf.GGUFReader(str(path)).get_field(key)
    return None if f is None else str(bytes(f.parts[f.data[0]]), "utf-8")


def test_imatrix_names_every_quantized_edge_tensor_and_round_trips(ckpt, imatrix_path, tmp_path):
    im = Imatrix.load(imatrix_path)
    f32 = export_gguf(ckpt, "f32", tmp_path / "e.gguf")
    shapes = {t.name: t.shape.tolist() for t in gguf.GGUFReader(str(f32)).tensors}
    matrices = {n for n, s in shapes.items() if len(s) == 2 and n != "token_embd.weight"}
    assert set(im.sums) == matrices  # every matmul weight of the edge GGUF, output head included
    for name, v in im.values().items():
        assert v.shape == (shapes[name][0],) and np.all(v > 0)  # one weight per input column (ne[0])
    counts = set(im.counts.values())
    assert len(counts) == 1 and counts.pop() > 100
    assert im.fingerprint == fingerprint(ckpt) and im.datasets[0].endswith("calib.txt")
    again = Imatrix.load(im.save(tmp_path / "copy.gguf"))
    for name, v in im.values().items():
        np.testing.assert_array_equal(again.values()[name], v)


def test_imatrix_is_the_mean_square_of_each_input(ckpt, ids):
    """Independently of the hooks: the output head's entry from the split exit's normed hidden state, and
    blk.0.attn_q's from layer 0's input norm of the embeddings."""
    model = load(ckpt, layers=(0, QUANT_CONFIG.split_layer), dtype=torch.float32)
    im = collect(model, [ids[:60], ids[60:]]).values()
    split = QUANT_CONFIG.split_layer
    with torch.no_grad():
        x = [torch.tensor([c]) for c in (ids[:60], ids[60:])]
        hid = torch.cat([model.stage(0, split)(t).hidden[0] for t in x])
        emb = torch.cat([model.embed(t)[0] for t in x])
        head = (model.exits[str(split)].norm(hid) ** 2).mean(0)
        q_in = (model.model.layers["0"].input_layernorm(emb) ** 2).mean(0)
    np.testing.assert_allclose(im["output.weight"], head.numpy(), rtol=1e-4)
    np.testing.assert_allclose(im["blk.0.attn_q.weight"], q_in.numpy(), rtol=1e-4)
    # columns differ by orders of magnitude here, which is what makes the imatrix matter
    assert im["blk.1.ffn_gate.weight"].max() > 30 * im["blk.1.ffn_gate.weight"].min()


def test_mix_keeps_embedding_output_and_layers_at_their_types(ckpt, imatrix_path, tmp_path):
    plain = tmp_path / "plain.gguf"
    assert export_main(["--model", str(ckpt), "--quant", "q4_0", "--out", str(plain)]) == 0
    t = types_of(plain)
    assert t["token_embd.weight"] == "Q4_0" and t["output.weight"] == "Q6_K"  # llama.cpp's own q4_0 rules
    assert meta(plain, "coexit.quant") is None and meta(plain, "quantize.imatrix.file") is None

    mix = tmp_path / "mix.gguf"
    assert export_main(["--model", str(ckpt), "--quant", "q4-mix", "--imatrix", str(imatrix_path),
                        "--out", str(mix)]) == 0
    t = types_of(mix)
    assert t["token_embd.weight"] == "Q8_0" and t["output.weight"] == "Q8_0"
    assert {t[f"blk.0.{w}.weight"] for w in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                              "ffn_down")} == {"Q8_0"}
    assert {t[f"blk.{i}.{w}.weight"] for i in (1, 2) for w in ("attn_q", "ffn_gate", "ffn_up")} == {"Q4_K"}
    assert meta(mix, "coexit.quant") == "q4-mix" and meta(mix, "quantize.imatrix.file") == "imatrix.gguf"
    assert mix.with_name("mix.exits.gguf").is_file()

    layers = tmp_path / "layers.gguf"
    export_gguf(ckpt, "q4_k_m", layers, embd="q6_k", output="f16", keep_layers=(0,), keep_type="q8_0",
                imatrix=False)
    t = types_of(layers)
    assert t["token_embd.weight"] == "Q6_K" and t["output.weight"] == "F16"
    assert t["blk.0.attn_q.weight"] == "Q8_0" and t["blk.0.ffn_down.weight"] == "Q8_0"
    assert t["blk.1.attn_q.weight"] == "Q4_K" and t["blk.2.ffn_gate.weight"] == "Q4_K"
    assert meta(layers, "coexit.quant") == "q4_k_m+embd:q6_k+output:f16+blk.0:q8_0"
    b = LlamaCppBackend(layers)
    assert b.step([5, 6, 7], 0, None).exit_logits[3].isfinite().all()
    b.close()

    per_tensor = tmp_path / "tensors.gguf"
    assert export_main(["--model", str(ckpt), "--quant", "q4-mix", "--imatrix", "none", "--keep-tensors",
                        "attn_v,ffn_down", "--out", str(per_tensor)]) == 0
    t = types_of(per_tensor)
    assert {t[f"blk.{i}.{w}.weight"] for i in (1, 2) for w in ("attn_v", "ffn_down")} == {"Q8_0"}
    assert {t[f"blk.{i}.{w}.weight"] for i in (1, 2) for w in ("attn_q", "ffn_gate", "ffn_up")} == {"Q4_K"}
    assert meta(per_tensor, "coexit.quant") == \
        "q4_k_m+embd:q8_0+output:q8_0+blk.0:q8_0+blk.*.attn_v:q8_0+blk.*.ffn_down:q8_0"


def test_checkpoint_imatrix_is_used_by_default(ckpt, imatrix_path, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(ckpt, d)
    shutil.copy(imatrix_path, d / IMATRIX_FILE)
    auto = export_gguf(d, "q4_0", tmp_path / "auto.gguf")
    assert meta(auto, "quantize.imatrix.file") == IMATRIX_FILE
    assert int(meta(auto, "quantize.imatrix.entries_count")) == len(Imatrix.load(imatrix_path).sums)
    off = tmp_path / "off.gguf"
    assert export_main(["--model", str(d), "--quant", "q4_0", "--imatrix", "none", "--out", str(off)]) == 0
    assert meta(off, "quantize.imatrix.file") is None
    q8 = export_gguf(d, "q8_0", tmp_path / "q8.gguf")  # Q8_0 rounding ignores an imatrix: none recorded
    assert meta(q8, "quantize.imatrix.file") is None
    # and the imatrix changed the 4-bit weights
    a, b = (gguf.GGUFReader(str(p)) for p in (auto, off))
    ta, tb = ({t.name: np.array(t.data) for t in r.tensors} for r in (a, b))
    assert not np.array_equal(ta["blk.1.ffn_up.weight"], tb["blk.1.ffn_up.weight"])


def test_imatrix_of_another_checkpoint_is_refused(ckpt, imatrix_path, quant_dir, tmp_path):
    with pytest.raises(ValueError, match="another checkpoint"):
        export_gguf(quant_dir, "q4_0", tmp_path / "x.gguf", imatrix=imatrix_path)
    assert export_main(["--model", str(quant_dir), "--quant", "q4_0", "--imatrix", str(imatrix_path),
                        "--out", str(tmp_path / "y.gguf")]) == 1


def _errors(path, ref_rows, ref_logits, ids):
    b = LlamaCppBackend(path)
    logits = [b.step([t], i, None).exit_logits[3] for i, t in enumerate(ids)]
    _, rows = b.take_split_rows()
    b.close()  # an idle llama.cpp context's worker threads would compete with the next one for the CPU
    lg = torch.stack(logits)
    return (float((rows - ref_rows).norm() / ref_rows.norm()), float((lg - ref_logits).norm() / ref_logits.norm()))


@pytest.mark.parametrize("quant", ["q4_0", "q4_k_m"])
def test_imatrix_brings_stock_llamacpp_closer_to_fp32(quant, ckpt, imatrix_path, ids, tmp_path):
    """Split rows and split-exit logits over the text, vs torch fp32: closer with the imatrix than without."""
    torch.set_num_threads(2)
    t = TorchBackend.from_checkpoint(ckpt)
    ref_logits = torch.stack([t.step([x], i, None).exit_logits[3] for i, x in enumerate(ids)])
    _, ref_rows = t.take_split_rows()
    with_im = export_gguf(ckpt, quant, tmp_path / "im.gguf", imatrix=imatrix_path)
    without = export_gguf(ckpt, quant, tmp_path / "plain.gguf", imatrix=False)
    e_im, e_plain = _errors(with_im, ref_rows, ref_logits, ids), _errors(without, ref_rows, ref_logits, ids)
    assert e_im[0] < e_plain[0] and e_im[1] < e_plain[1], (e_im, e_plain)
