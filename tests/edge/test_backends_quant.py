"""Quantized edge backends against the torch fp32 edge (TorchBackend): real llama.cpp and bitsandbytes kernels.

Errors are relative Frobenius norms, ||x - ref|| / ||ref||, over all split rows of a token stream, or over the
stacked exit logits of the decode steps. Bounds and why:
- GGUF f32 (f32 KV cache, no flash attention) vs torch: 1e-4. Same arithmetic up to summation order and ggml's
  RoPE angle recurrence (measured ~2e-6); anything wrong in the export (Q/K permutation, tensor mapping, norms)
  gives errors of order 1.
- GGUF f16 vs torch: 1e-2. f16 rounds each weight and cached K/V by up to 2^-11 (~5e-4 relative); over ~21
  matmuls in 3 layers that compounds to a few 1e-3 (measured 1.5e-3); top-1 of every exit agrees >= 95%.
- Q8_0 vs torch: 0.08 (measured 0.037). Weights are rounded to 8 bits per block of 32 (~0.5% rms) and llama.cpp
  also quantizes the activations to Q8_0 for the dot products; the noise compounds through attention and SwiGLU.
- Q4_0 / Q4_K_M vs torch: 0.6 / 0.5 (measured 0.42 / 0.34). 4-bit rounding of i.i.d. Gaussian weights (no
  outliers, no redundancy) is ~8% rms per matmul and compounds; bitsandbytes NF4 on the same model measures the
  same (0.37), which tells the format apart from a runtime bug; an unrelated output would measure ~1.4.
  The runtime itself is checked tightly against torch running the GGUF's own dequantized weights: 0.06 for all
  quant types (measured 0.023-0.034, the cost of llama.cpp's Q8_0/Q8_K activation quantization).
- bitsandbytes int8 (LLM.int8, threshold 6) vs fp32: 0.06 (measured 0.031); NF4 vs fp32: 0.55 (measured 0.37);
  NF4 vs fp32 torch on bitsandbytes' own dequantized weights: 1e-4 (fp32 compute after dequantization).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coexit.checkpoint import fingerprint
from coexit.exits import ExitPolicy
from edge.backends.registry import make_backend
from edge.backends.torch_backend import TorchBackend

pytest.importorskip("llama_cpp")
pytest.importorskip("bitsandbytes")

from edge.backends.gguf_heads import read_edge_gguf  # noqa: E402
from edge.backends.llamacpp import LlamaCppBackend  # noqa: E402
from edge.export.cli import main as export_main  # noqa: E402

STREAM = torch.randint(3, 380, (40,), generator=torch.Generator().manual_seed(1)).tolist()
PREFILL = 16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def run_stream(backend, tokens=STREAM):
    """Prefill, then one token per step; returns (split rows (n, C), [exit_logits per decode step])."""
    backend.reset()
    backend.step(tokens[:PREFILL], 0, None)
    logits = [backend.step([t], PREFILL + i, None).exit_logits for i, t in enumerate(tokens[PREFILL:])]
    first, rows = backend.take_split_rows()
    assert first == 0 and rows.shape[0] == len(tokens)
    return rows, logits


def stacked(logits, e):
    return torch.stack([step[e] for step in logits])


@pytest.fixture(scope="module")
def qdir(quant_dir):
    return quant_dir


@pytest.fixture(scope="module")
def gguf_files(qdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    files = {}
    for quant in ("f16", "q8_0", "q4_0", "q4_k_m"):
        files[quant] = out / f"edge-{quant}.gguf"
        assert export_main(["--model", str(qdir), "--format", "gguf", "--quant", quant,
                            "--out", str(files[quant])]) == 0
    return files


@pytest.fixture(scope="module")
def torch_ref(qdir):
    torch.set_num_threads(2)
    return run_stream(TorchBackend.from_checkpoint(qdir))


def test_export_is_a_stock_llama_gguf(gguf_files, qdir):
    import gguf

    r = gguf.GGUFReader(str(gguf_files["q4_k_m"]))
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "blk.0.attn_q.weight", "blk.2.ffn_down.weight", "output_norm.weight",
            "output.weight"} <= names
    assert not any(n.startswith("blk.3.") for n in names)  # only layers [0, split)
    assert int(r.get_field("llama.block_count").parts[-1][0]) == 3
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.ffn_gate.weight"] == "Q4_K" and types["output_norm.weight"] == "F32"
    meta = read_edge_gguf(gguf_files["q4_k_m"])
    assert meta.fingerprint == fingerprint(qdir) and sorted(meta.heads) == [1, 2]
    assert gguf_files["q4_k_m"].with_name("edge-q4_k_m.exits.gguf").is_file()  # own (unshared) exit heads


def test_gguf_f32_matches_torch_exactly(tiny_dir, tmp_path):
    """tiny flavour: shared LM head, so early exits reuse the GGUF's `output` tensor."""
    path = tmp_path / "tiny-f32.gguf"
    assert export_main(["--model", str(tiny_dir), "--quant", "f32", "--out", str(path)]) == 0
    ref_rows, ref = run_stream(TorchBackend.from_checkpoint(tiny_dir))
    b = LlamaCppBackend(path, kv_type="f32", flash_attn=False)
    rows, got = run_stream(b)
    assert b.exit_layers == [2, 3]
    assert rel(rows, ref_rows) < 1e-4
    for e in b.exit_layers:
        assert rel(stacked(got, e), stacked(ref, e)) < 1e-4
        assert torch.equal(stacked(got, e).argmax(-1), stacked(ref, e).argmax(-1))


# quant: (bound on split rows and on each exit's logits vs fp32 torch, min top-1 agreement or None)
GGUF_BOUNDS = {"f16": (1e-2, 0.95), "q8_0": (0.08, 0.75), "q4_0": (0.6, None), "q4_k_m": (0.5, None)}


@pytest.mark.parametrize("quant", list(GGUF_BOUNDS))
def test_gguf_vs_torch_fp32(quant, gguf_files, torch_ref):
    bound, top1 = GGUF_BOUNDS[quant]
    rows, got = run_stream(LlamaCppBackend(gguf_files[quant]))
    ref_rows, ref = torch_ref
    assert rel(rows, ref_rows) < bound
    for e in (1, 2, 3):
        assert rel(stacked(got, e), stacked(ref, e)) < bound
        if top1 is not None:
            agree = (stacked(got, e).argmax(-1) == stacked(ref, e).argmax(-1)).float().mean()
            assert agree >= top1, f"exit {e}: top-1 agreement {agree:.2f}"


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_k_m"])
def test_gguf_runtime_matches_its_own_weights(quant, gguf_files, qdir, dequantized_model):
    """llama.cpp vs torch running the GGUF's dequantized weights: only activation quantization remains."""
    path = gguf_files[quant]
    ref_model = dequantized_model(path, qdir)
    with torch.no_grad():  # the early exits' sidecar projections, as stored (Q8_0)
        for e, head in read_edge_gguf(path).heads.items():
            ref_model.exits[str(e)].lm_head.weight.copy_(head.proj)
    ref_rows, ref = run_stream(TorchBackend(ref_model))
    rows, got = run_stream(LlamaCppBackend(path))
    assert rel(rows, ref_rows) < 0.06
    for e in (1, 2, 3):
        assert rel(stacked(got, e), stacked(ref, e)) < 0.06


def _contract_stream(backend, decide_at):
    """A stream mixing prefill chunks, single steps, and steps that exit at the first exit (decide_at)."""
    backend.reset()
    results, taken, pos = [], [], 0
    steps = [STREAM[:8], *[[t] for t in STREAM[8:20]], STREAM[20:23], *[[t] for t in STREAM[23:30]]]
    for i, toks in enumerate(steps):
        exit_now = i % 3 == 1
        policy = ExitPolicy.always(decide_at) if exit_now else ExitPolicy.never()
        r = backend.step(toks, pos, policy.decide)
        results.append((r.depth, r.exited))
        pos += len(toks)
        assert backend.next_position == pos
        if not exit_now:
            taken.append(backend.take_split_rows())
    # every position exactly once, in order
    expect = 0
    for first, rows in taken:
        assert first == expect
        expect += rows.shape[0]
    assert expect == pos
    return results, torch.cat([rows for _, rows in taken])


@pytest.mark.parametrize("kind,kw,bound", [
    ("gguf", {"quant": "f16"}, 1e-2), ("gguf", {"quant": "q8_0"}, 0.08),
    ("bnb-int8", {}, 0.06), ("bnb-nf4", {}, 0.55)])
def test_same_stream_same_contract(kind, kw, bound, qdir, tmp_path):
    torch.set_num_threads(2)
    if kind == "gguf":
        kw = {**kw, "out": tmp_path / "e.gguf"}
    backend = make_backend(kind, qdir, **kw)
    assert backend.fingerprint == fingerprint(qdir)
    assert backend.exit_layers == [1, 2, 3] and backend.split == 3
    ref = TorchBackend.from_checkpoint(qdir)
    res, rows = _contract_stream(backend, decide_at=1)
    ref_res, ref_rows = _contract_stream(ref, decide_at=1)
    assert res == ref_res
    assert (1, True) in res and (3, False) in res
    assert rel(rows, ref_rows) < bound


def test_gguf_truncate_and_reset_reuse_the_cache(gguf_files):
    b = LlamaCppBackend(gguf_files["q8_0"])
    rows, _ = run_stream(b)
    b.truncate(25)  # roll back: llama_memory_seq_rm drops positions >= 25
    assert b.next_position == 25
    b.step(STREAM[25:], 25, None)
    first, again = b.take_split_rows()
    assert first == 25 and np.allclose(again.numpy(), rows[25:].numpy(), atol=1e-4 * float(rows.abs().max()))
    with pytest.raises(ValueError, match="expects position"):
        b.step([5], 3, None)


def test_bnb_modules_and_early_exit_skip_layers(qdir):
    import bitsandbytes as bnb

    b = make_backend("bnb-nf4", qdir)
    kinds = {type(m) for m in b.model.model.layers["0"].modules()}
    assert bnb.nn.Linear4bit in kinds and torch.nn.Linear not in kinds
    assert type(b.model.exits["1"].lm_head) is torch.nn.Linear  # heads stay fp32
    r = b.step(STREAM[:4], 0, ExitPolicy.always(1).decide)
    assert (r.depth, r.exited, r.rows_computed) == (1, True, 4)  # layers 2 and 3 really skipped


@pytest.mark.parametrize("mode,bound", [("int8", 0.06), ("nf4", 0.55)])
def test_bnb_vs_fp32(mode, bound, qdir, torch_ref):
    rows, got = run_stream(make_backend(f"bnb-{mode}", qdir))
    ref_rows, ref = torch_ref
    assert rel(rows, ref_rows) < bound
    for e in (1, 2, 3):
        assert rel(stacked(got, e), stacked(ref, e)) < bound


def test_bnb_nf4_computes_with_its_dequantized_weights(qdir):
    import bitsandbytes.functional as bf

    b = make_backend("bnb-nf4", qdir)
    ref = TorchBackend.from_checkpoint(qdir)
    with torch.no_grad():
        for i in range(3):
            q_block, r_block = b.model.model.layers[str(i)], ref.model.model.layers[str(i)]
            for name, mod in q_block.named_modules():
                if hasattr(mod, "weight") and hasattr(mod.weight, "quant_state"):
                    w = bf.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
                    r_block.get_submodule(name).weight.copy_(w)
    rows, got = run_stream(b)
    ref_rows, ref_logits = run_stream(ref)
    assert rel(rows, ref_rows) < 1e-4
    assert rel(stacked(got, 3), stacked(ref_logits, 3)) < 1e-4


def test_make_backend_rejects_unknown_kind(qdir):
    with pytest.raises(ValueError, match="unknown edge backend"):
        make_backend("onnx", qdir)


@pytest.mark.parametrize("flavour", ["tiny-mha", "tiny-tied", "tiny-llama3", "tiny-qwen2"])
def test_gguf_f32_flavours(flavour, checkpoint_factory, tmp_path):
    """Unshared heads (sidecar), tied embeddings, llama3 RoPE scaling (rope_freqs), Qwen2 qkv bias (arch qwen2)."""
    ckpt = checkpoint_factory(flavour)
    path = tmp_path / "e.gguf"
    assert export_main(["--model", str(ckpt), "--quant", "f32", "--out", str(path)]) == 0
    b, t = LlamaCppBackend(path, kv_type="f32"), TorchBackend.from_checkpoint(ckpt)
    rb, rt = b.step(STREAM[:20], 0, None), t.step(STREAM[:20], 0, None)
    assert rel(b.take_split_rows()[1], t.take_split_rows()[1]) < 1e-4
    for e in b.exit_layers:
        assert rel(rb.exit_logits[e], rt.exit_logits[e]) < 1e-4
