"""EE-tuning (real torchrun processes, PP=2) from a plain HF-style checkpoint (no exit heads: they start as copies
of the final norm and LM head): only exit heads change, every backbone tensor stays bit-identical, and a run
resumed from a mid-run DeepSpeed checkpoint ends exactly where the uninterrupted run ended."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from training.data import prepare
from training.launch import launch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from coexit.tiny import SAMPLE_TEXT

    root = tmp_path_factory.mktemp("corpus")
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t * 3}) + "\n" for t in SAMPLE_TEXT * 6))
    out = tmp_path_factory.mktemp("data")
    prepare([root], out, vocab_size=384, val_fraction=0.2, seed=1)
    return out


def hf_style(src, dst):
    """A copy of a coexit checkpoint without exit tensors and without the early_exit block, like an HF model."""
    dst.mkdir()
    state = {k: v for k, v in load_file(str(src / "model.safetensors")).items() if not k.startswith("exits.")}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    del config["early_exit"]
    (dst / "config.json").write_text(json.dumps(config))
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    return dst


def job_text(source, data_dir, steps: int) -> str:
    return f"""
[model]
source = "{source}"
exit_layers = [1, 2, 4]
share_lm_head = false
loss_weights = [0.5, 0.5, 0.5, 1.0]
[data]
path = "{data_dir}"
seq_len = 16
[train]
mode = "ee-tune"
steps = {steps}
micro_batch_size = 2
grad_accum = 2
lr = 0.01
grad_clip = 1.0
exit_warmup_steps = 2
eval_batches = 1
log_file = "metrics.jsonl"
log_every = 1
progress = false
[parallel]
pp = 2
[checkpoint]
dir = "ckpt"
every = 1
[export]
dir = "export"
"""


def test_ee_tune_freezes_backbone_and_resumes(tmp_path, data_dir, checkpoint_factory):
    source = hf_style(checkpoint_factory("tiny-mha"), tmp_path / "hf")  # exits 1, 2, 4 get LM heads of their own
    full = tmp_path / "full"
    full.mkdir()
    (full / "job.toml").write_text(job_text(source, data_dir, 3))
    launch(2, full / "job.toml")

    before = load_file(str(source / "model.safetensors"))
    after = load_file(str(full / "export" / "model.safetensors"))
    exits = {f"exits.{e}.{w}": before["model.norm.weight" if w == "norm.weight" else "lm_head.weight"]
             for e in (1, 2, 4) for w in ("norm.weight", "lm_head.weight")}  # where each exit started
    assert set(after) == set(before) | set(exits)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"EE-tuning changed backbone tensors {changed}"
    untrained = [k for k, v in exits.items() if torch.equal(after[k], v)]
    assert not untrained, f"exit tensors {untrained} did not train"

    recs = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in recs if r.get("split") == "val"]
    assert len(val) == 1 and val[0]["step"] == 3 and all(val[0][f"val_exit{e}"] > 0 for e in (1, 2, 4))
    recs = [r for r in recs if "split" not in r]
    assert [r["step"] for r in recs] == [1, 2, 3]
    w = [r["exit_weights"][0] for r in recs]
    assert w[0] == pytest.approx(w[2] / 2) and w[1] == pytest.approx(w[2])  # linear warm-up over 2 steps
    assert all(r["exit1"] > 0 and r["exit2"] > 0 and r["exit4"] > 0 for r in recs)

    # resume: start again from the step-2 checkpoint; the third step must reproduce the uninterrupted run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "ckpt" / "step2", resumed / "ckpt" / "step2")
    (resumed / "ckpt" / "latest").write_text("step2")
    (resumed / "job.toml").write_text(job_text(source, data_dir, 3))
    proc = launch(2, resumed / "job.toml")
    assert "resumed from" in proc.stdout + proc.stderr
    again = load_file(str(resumed / "export" / "model.safetensors"))
    for k in after:
        torch.testing.assert_close(again[k], after[k], atol=1e-7, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()] == [3, 3]


def _agreement(model_dir, data_dir) -> dict[int, float]:
    """Exit/final top-1 agreement on the held-out shards."""
    import coexit
    from training.data import TokenShards

    model = coexit.load(model_dir)
    val = TokenShards(data_dir, "val", 16, 0)
    agree, total = {e: 0 for e in (1, 2)}, 0
    with torch.no_grad():
        for i in range(8):
            ids, _ = val.batch(4 * i, 4)
            out = model(ids, exits=[1, 2])
            final = out.logits.argmax(-1)
            for e in agree:
                agree[e] += int((out.exit_logits[e].argmax(-1) == final).sum())
            total += final.numel()
    return {e: a / total for e, a in agree.items()}


def test_self_distillation_raises_exit_final_agreement(tmp_path, data_dir, checkpoint_factory):
    """EE-tuning with `distill` (KL from the final head to each exit) against the same run without it, from the
    same start, on held-out data: the exits agree with the final head more often."""
    source = hf_style(checkpoint_factory("tiny-mha"), tmp_path / "hf")
    result = {}
    for distill in (0.0, 4.0):
        run = tmp_path / f"d{distill:g}"
        run.mkdir()
        text = job_text(source, data_dir, 12).replace("pp = 2", "pp = 1").replace("exit_layers = [1, 2, 4]",
                                                                                   "exit_layers = [1, 2]")
        text = text.replace("loss_weights = [0.5, 0.5, 0.5, 1.0]", "loss_weights = [0.5, 0.5, 1.0]")
        text = text.replace('mode = "ee-tune"', f'mode = "ee-tune"\ndistill = {distill}')
        (run / "job.toml").write_text(text)
        launch(1, run / "job.toml")
        result[distill] = _agreement(run / "export", data_dir)
    assert all(result[4.0][e] > result[0.0][e] for e in (1, 2)), result


@pytest.mark.parametrize("setting, message", [
    ("distill = 1.0", "distill needs every exit on the last pipeline stage"),
    ("time_limit_s = 60\ntime_probe_steps = 0", "time_probe_steps >= 1"),  # its pace would be measured over 0 steps
])
def test_an_unusable_train_setting_is_refused_at_validation(setting, message, tmp_path, data_dir, checkpoint_factory):
    from training.job import JobError, load_job, validate

    source = hf_style(checkpoint_factory("tiny-mha"), tmp_path / "hf")
    (tmp_path / "job.toml").write_text(job_text(source, data_dir, 2).replace(
        'mode = "ee-tune"', f'mode = "ee-tune"\n{setting}'))
    with pytest.raises(JobError, match=message):
        validate(load_job(tmp_path / "job.toml"), 2)
