"""Parallel training equals a single-process reference: one optimizer step under PP x TP x DP (real torchrun
processes, gloo, fp32) gives the same parameters as the same weighted multi-exit loss computed in one process;
the exported checkpoint reloads with coexit.load and reproduces the pipeline's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import coexit
from training.data import TokenShards, prepare, sample_index
from training.launch import launch
from training.stages import init_model

SEQ, MB, GAS, LR = 16, 2, 2, 0.05


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from coexit.tiny import SAMPLE_TEXT

    root = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (root / f"doc{i}.txt").write_text(SAMPLE_TEXT[i % 5] * (1 + i % 3) + f"# {i}\n")
    out = tmp_path_factory.mktemp("data")
    prepare([root], out, vocab_size=384, val_fraction=0.1, seed=0)
    return out


def write_job(path: Path, **sections) -> Path:
    lines = []
    for name, body in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in body.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def reference_step(model: coexit.EarlyExitLM, data_dir: Path, dp: int, clip: float = 0.0):
    """One SGD step on mean over (dp rank, micro-batch) of sum_e w_e CE_e + w_L CE_L, in one process, with the
    gradient clipped to global norm `clip` (DeepSpeed's rule: scale by clip / (norm + 1e-6) when that is < 1).
    Returns the new state and the gradient norm."""
    cfg = model.config
    data = TokenShards(data_dir, "train", SEQ, 0)
    model.train()
    total = 0.0
    for r in range(dp):
        for m in range(GAS):
            ids, labels = data.batch(sample_index(0, m, r, GAS, dp, MB), MB)
            out = model(ids, exits="all")
            loss = cfg.loss_weight(cfg.num_hidden_layers) * F.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
            for e, logits in out.exit_logits.items():
                loss = loss + cfg.loss_weight(e) * F.cross_entropy(logits.flatten(0, 1), labels.flatten())
            total = total + loss / (dp * GAS)
    total.backward()
    with torch.no_grad():
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()
        scale = clip / (norm + 1e-6) if clip > 0 and clip / (norm + 1e-6) < 1 else 1.0
        new = {k: (p - LR * scale * p.grad).detach().clone() for k, p in model.named_parameters()}
    return {k: new[k] if k in new else v for k, v in model.state_dict().items()}, norm  # tied names share a tensor


LAYOUTS = [  # (pp, tp, dp, flavour, init, grad_clip); "tiny" shares the LM head between stage 0's exits and stage 1,
    # "tiny-tied" also ties it to the embedding
    pytest.param(2, 1, 2, "tiny-tied", "checkpoint", 0.0, id="pp2-dp2-tied"),
    pytest.param(2, 2, 1, "tiny-mha", "checkpoint", 0.0, id="pp2-tp2"),
    pytest.param(2, 2, 2, "tiny", "scratch", 1.0, id="pp2-tp2-dp2-clipped"),
]


@pytest.mark.parametrize(("pp", "tp", "dp", "flavour", "init", "clip"), LAYOUTS)
def test_parallel_step_equals_reference(pp, tp, dp, flavour, init, clip, tmp_path, data_dir, checkpoint_factory):
    model_section = {"source": str(checkpoint_factory(flavour))} if init == "checkpoint" else \
        {"flavour": flavour, "seed": 7}
    job = write_job(tmp_path / "job.toml", model=model_section,
                    data={"path": str(data_dir), "seq_len": SEQ},
                    train={"mode": "finetune" if init == "checkpoint" else "pretrain", "steps": 1,
                           "micro_batch_size": MB, "grad_accum": GAS, "optimizer": "sgd", "lr": LR, "min_lr": LR,
                           "grad_clip": clip, "log_file": "metrics.jsonl", "progress": False},
                    parallel={"pp": pp, "tp": tp, "dp": dp},
                    export={"dir": "export"}, debug={"dump_logits": "logits.pt"})
    launch(pp * tp * dp, job)

    ref_model = coexit.load(checkpoint_factory(flavour)) if init == "checkpoint" else \
        init_model(coexit.Config.flavour(flavour), seed=7)
    before = {k: v.detach().clone() for k, v in ref_model.state_dict().items()}
    expected, norm = reference_step(ref_model, data_dir, dp, clip)
    assert clip == 0 or norm > 1.5 * clip, f"gradient norm {norm} would not be clipped at {clip}"
    got = load_file(str(tmp_path / "export" / "model.safetensors"))
    tied = {"lm_head.weight"} if ref_model.config.tie_word_embeddings else set()  # saved once, as the embedding
    assert set(got) == set(before) - tied, "exported tensor names differ from coexit's"
    moved = 0.0
    for name, want in expected.items():
        if name in tied:
            continue
        assert got[name].shape == want.shape, name
        torch.testing.assert_close(got[name], want, atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        moved = max(moved, (want - before[name]).abs().max().item())
    assert moved > 1e-3, "the step changed nothing: the comparison would be vacuous"

    # export round trip: coexit.load(export) gives the trained pipeline's logits
    dumped = torch.load(tmp_path / "logits.pt")
    reloaded = coexit.load(tmp_path / "export")
    assert reloaded.tokenizer is not None
    with torch.no_grad():
        logits = reloaded(dumped["ids"]).logits
    torch.testing.assert_close(logits, dumped["logits"], atol=1e-5, rtol=1e-5)

    # per-exit losses were logged
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for e in ref_model.config.exit_layers:
        assert rec[f"exit{e}"] > 0
    assert rec["final"] > 0
