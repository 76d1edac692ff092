"""Job files that cannot run fail before launch with a message naming the key; prepare-data is deterministic,
reads files, directories and JSONL, and holds out a split."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coexit.tiny import SAMPLE_TEXT
from training import cli
from training.data import TokenShards
from training.data import main as prepare_main


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i, t in enumerate(SAMPLE_TEXT * 4):
        (root / f"{i:02d}.txt").write_text(t + f"# {i}\n")
    out = tmp_path_factory.mktemp("data")
    assert prepare_main([str(root), "--out", str(out), "--vocab-size", "300", "--val-fraction", "0.25"]) == 0
    return out


GOOD = """
[model]
flavour = "tiny"
[data]
path = "{data}"
seq_len = 16
[train]
mode = "pretrain"
[parallel]
pp = 2
tp = 2
"""


def check(tmp_path, capsys, text: str, world: int):
    job = tmp_path / "job.toml"
    job.write_text(text)
    code = cli.main(["--config", str(job), "--check", "--world-size", str(world)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_good_job_passes_check(tmp_path, capsys, data_dir):
    code, out = check(tmp_path, capsys, GOOD.format(data=data_dir), 8)
    assert code == 0 and "pp 2 x tp 2 x dp 2" in out and "[(0, 3), (3, 6)]" in out


@pytest.mark.parametrize(("edit", "world", "message"), [
    (("seq_len = 16", "seq_len = 16\nseq_length = 8"), 8, "unknown key seq_length in [data]"),
    (("[parallel]", "[paralel]\n[parallel]"), 8, "unknown section paralel"),
    (("tp = 2", "tp = 2\ndp = 2"), 4, "pp x tp x dp = 2 x 2 x 2 = 8 but the launcher started 4 processes"),
    (("flavour = \"tiny\"", "flavour = \"tiny\"\nexit_layers = [2, 9]"), 8,
     "exit_layers entry 9 is beyond the model"),
], ids=["unknown-key", "unknown-section", "world-size", "exit-beyond-layers"])
def test_bad_job_fails_before_launch(tmp_path, capsys, data_dir, edit, world, message):
    code, out = check(tmp_path, capsys, GOOD.format(data=data_dir).replace(*edit), world)
    assert code == 2
    assert message in out, out


def test_bad_job_fails_without_check_flag(tmp_path, capsys, data_dir, monkeypatch):
    """Under a launcher the same validation runs before DeepSpeed is imported or any group is formed."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    job = tmp_path / "job.toml"
    job.write_text(GOOD.format(data=data_dir))
    assert cli.main(["--config", str(job)]) == 2
    assert "does not divide the world size 3" in capsys.readouterr().err


def test_prepare_data_deterministic_with_held_out_split(tmp_path, data_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["documents"] == {"train": 15, "val": 5}
    assert (data_dir / "tokenizer.json").is_file()
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for t in SAMPLE_TEXT * 4))
    outs = []
    for name in ("a", "b"):
        prepare_main([str(jsonl), "--out", str(tmp_path / name), "--vocab-size", "300", "--seed", "3",
                      "--text-key", "body", "--shard-tokens", "100"])
        outs.append(tmp_path / name)
    files = sorted(p.name for p in outs[0].iterdir())
    assert "train-00001.bin" in files  # sharded at 100 tokens
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    shards = TokenShards(outs[0], "train", 8, seed=0)
    ids, labels = shards.batch(0, 3)
    assert ids.shape == (3, 8) and np.array_equal(ids[:, 1:].numpy(), labels[:, :-1].numpy())
    assert int(ids.max()) < 300


def test_time_limit_shortens_the_run_and_keeps_the_cosine_ending_at_min_lr():
    """time_limit_s turns `steps` into an upper bound, fitted from the measured pace; the LR schedule follows the
    new length, so a budgeted run still anneals to min_lr at its last step."""
    import torch

    from training.job import TrainSection
    from training.trainer import _optimizer, fit_time_budget

    t = TrainSection(steps=1000, lr=1e-3, min_lr=1e-4, lr_warmup_steps=50, time_limit_s=100.0)
    fit_time_budget(t, step=20, per_step_s=0.5, elapsed_s=12.0)
    assert t.steps == 20 + int(88.0 / 0.5)  # 196
    fit_time_budget(t, step=20, per_step_s=0.01, elapsed_s=12.0)
    assert t.steps == 196  # never longer than asked
    job = type("J", (), {"train": t})()
    opt, sched = _optimizer(job, torch.nn.Linear(2, 2))
    lrs = []
    for _ in range(t.steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[49] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4, rel=1e-2)
