"""`coexit adapt` (edge/apps/adapt.py): windowed LoRA tuning of the edge layers, one window per edge exit, resumable,
in PEFT's layout; the adapted edge fits the user's text better at every exit it trained, and runs on the backends."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

import coexit
from coexit.lora import PARENT, TARGETS, LoraConfig, add_lora, merge_adapter, read_adapter
from coexit.tiny import SAMPLE_TEXT
from edge.apps.adapt import FINAL_LR, adapt, exit_loss, lr_scale, window_loss, windows
from edge.backends import make_backend

TEXT = "\n".join(SAMPLE_TEXT) if isinstance(SAMPLE_TEXT, list) else SAMPLE_TEXT


def test_windows_close_at_the_edge_exits():
    assert windows([2, 4]) == [(0, 2), (2, 4)]
    assert windows([1, 2, 3]) == [(0, 1), (1, 2), (2, 3)]


def test_the_cosine_schedule_warms_up_then_decays_each_window():
    steps = 300  # warmup: the first 30 steps
    lrs = [lr_scale(s, steps, "cosine") for s in range(steps)]
    assert lrs[0] == pytest.approx(1 / 30) and lrs[29] == 1.0 and lrs[-1] == pytest.approx(FINAL_LR)
    assert lrs[:30] == sorted(lrs[:30]) and lrs[29:] == sorted(lrs[29:], reverse=True)
    assert lr_scale(0, 1, "cosine") == 1.0 and {lr_scale(s, steps) for s in range(steps)} == {1.0}
    with pytest.raises(ValueError):
        lr_scale(0, steps, "step")


@pytest.fixture(scope="module")
def adapted(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapt")
    (d / "my_code.py").write_text(TEXT * 8)
    out = d / "adapter"
    report = adapt(tiny_dir, [str(d / "my_code.py")], out, steps=25, seq_len=32, batch=4, lr=3e-3, heldout=0.0,
                   progress=False)
    return out, report, d


def test_adapter_is_peft_and_covers_every_window(adapted, tiny_dir):
    out, report, _ = adapted
    cfg, weights = read_adapter(out)
    exits = coexit.read_config(tiny_dir).edge_exit_layers
    assert cfg.extra["windows_done"] == [list(w) for w in windows(exits)]
    assert {i for i, _ in weights} == set(range(coexit.read_config(tiny_dir).split_layer))
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert [w["exit"] for w in report["windows"]] == sorted(exits)


def test_the_adapted_exits_fit_the_text_better(adapted, tiny_dir):
    out, _, d = adapted
    split = coexit.read_config(tiny_dir).split_layer
    tok = coexit.load(tiny_dir).tokenizer
    ids = tok.encode(TEXT * 2)
    chunks = [ids[i:i + 33] for i in range(0, len(ids) - 33, 33)][:16]
    base = coexit.load(tiny_dir, layers=(0, split))
    tuned = coexit.load(tiny_dir, layers=(0, split))
    merge_adapter(tuned, out)
    for e in coexit.read_config(tiny_dir).edge_exit_layers:
        assert exit_loss(tuned, chunks, e) < exit_loss(base, chunks, e) - 0.05, e


def test_resume_skips_finished_windows(adapted, tiny_dir):
    out, _, d = adapted
    before = (out / "adapter_model.safetensors").read_bytes()
    again = adapt(tiny_dir, [str(d / "my_code.py")], out, steps=25, seq_len=32, batch=4, heldout=0.0,
                  progress=False)
    assert again["windows"] == [] and (out / "adapter_model.safetensors").read_bytes() == before


@pytest.fixture
def trained_sizes(monkeypatch) -> list[int]:
    """Per optimizer step of coexit adapt, how many parameters had a gradient (its AdamW, spied on)."""
    import edge.apps.adapt as mod

    seen: list[int] = []

    class Spy(torch.optim.AdamW):
        def step(self, *a, **k):
            seen.append(sum(p.numel() for g in self.param_groups for p in g["params"] if p.grad is not None))
            return super().step(*a, **k)

    monkeypatch.setattr(mod.torch.optim, "AdamW", Spy)
    return seen


def test_only_the_window_trains(tiny_dir, tmp_path, trained_sizes):
    """Below the window no autograd graph is built, and only the window's adapters get gradients."""
    (tmp_path / "t.py").write_text(TEXT * 8)
    seen = trained_sizes
    adapt(tiny_dir, [str(tmp_path / "t.py")], tmp_path / "a", steps=2, seq_len=16, batch=2, heldout=0.0,
          progress=False)
    assert seen == _window_sizes(tiny_dir, steps=2)


def _per_layer(tiny_dir) -> int:
    """The trainable adapter size of one edge layer at coexit adapt's default rank r: A (r, in) + B (out, r) per
    adapted linear."""
    r = inspect.signature(adapt).parameters["r"].default
    block = coexit.load(tiny_dir, layers=(0, 1)).model.layers["0"]
    return sum(r * (m.in_features + m.out_features) for m in (getattr(getattr(block, PARENT[t]), t) for t in TARGETS))


def _window_sizes(tiny_dir, steps: int) -> list[int]:
    """The trainable adapter size of each windowed step."""
    cfg = coexit.read_config(tiny_dir)
    return [(hi - lo) * _per_layer(tiny_dir) for lo, hi in windows(cfg.edge_exit_layers) for _ in range(steps)]


def test_the_joint_pass_tunes_every_edge_layer_once(tiny_dir, tmp_path, trained_sizes):
    """--joint-steps: after the windows, every edge layer's adapters train together (the loss at every edge exit);
    a resumed run that finished it does not run it again."""
    (tmp_path / "t.py").write_text(TEXT * 8)
    seen = trained_sizes
    report = adapt(tiny_dir, [str(tmp_path / "t.py")], tmp_path / "a", steps=2, seq_len=16, batch=2, heldout=0.0,
                   progress=False, joint_steps=3)
    split = coexit.read_config(tiny_dir).split_layer
    assert seen == _window_sizes(tiny_dir, steps=2) + [split * _per_layer(tiny_dir)] * 3
    assert report["windows"][-1]["joint"] and report["windows"][-1]["window"] == [0, split]
    cfg, _ = read_adapter(tmp_path / "a")
    assert cfg.extra["joint_done"] and cfg.extra["joint_steps"] == 3
    seen.clear()
    again = adapt(tiny_dir, [str(tmp_path / "t.py")], tmp_path / "a", steps=2, seq_len=16, batch=2, heldout=0.0,
                  progress=False, joint_steps=3)
    assert again["windows"] == [] and seen == []


def test_window_loss_recomputes_exactly_and_needs_no_second_model(tiny_dir):
    """Activation checkpointing changes nothing but memory: the same loss and the same adapter gradients; the
    consistency target taken with the adapters switched off is a fresh unadapted model's hidden state."""
    cfg = coexit.read_config(tiny_dir)
    lo, hi = windows(cfg.edge_exit_layers)[1]
    ids = torch.randint(3, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(4))
    model = coexit.load(tiny_dir, layers=(0, cfg.split_layer))
    for p in model.parameters():
        p.requires_grad_(False)
    mods = add_lora(model, LoraConfig(8, 16, TARGETS, tuple(range(0, hi))))
    torch.manual_seed(1)
    for m in mods:  # a trained-looking adapter: B away from zero, so the adapters change the output
        torch.nn.init.normal_(m.lora_B, std=0.05)
    params = [p for m in mods[-len(TARGETS) * (hi - lo):] for p in (m.lora_A, m.lora_B)]
    out = {}
    for ckpt in (False, True):
        loss = window_loss(model, lo, hi, ids, consistency=1.0, checkpoint=ckpt)
        grads = torch.autograd.grad(loss, params)
        out[ckpt] = (loss.detach(), grads)
    torch.testing.assert_close(out[True][0], out[False][0], atol=0, rtol=0)
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    plain = coexit.load(tiny_dir, layers=(0, cfg.split_layer))  # the consistency term against the real thing
    with torch.no_grad():
        x = ids[:, :-1]
        target = plain.run_layers(plain.embed(x), 0, None, 0, hi).hidden
        adapted = model.run_layers(model.embed(x), 0, None, 0, hi).hidden
        h = model.run_layers(model.embed(x), 0, None, 0, hi).hidden
        ce = torch.nn.functional.cross_entropy(model.head_logits(hi, h).flatten(0, 1), ids[:, 1:].flatten())
        want = ce + ((adapted - target) ** 2).mean() / (target ** 2).mean()
    assert not torch.allclose(adapted, target)
    torch.testing.assert_close(out[False][0], want, atol=1e-5, rtol=1e-5)


def test_a_bf16_base_trains_fp32_adapters(tiny_dir, tmp_path):
    """--base-dtype bf16: the frozen base in bf16, the adapters (and what is saved) fp32, and they learn."""
    (tmp_path / "t.py").write_text(TEXT * 8)
    report = adapt(tiny_dir, [str(tmp_path / "t.py")], tmp_path / "a", steps=6, seq_len=16, batch=2, heldout=0.0,
                   progress=False, base_dtype=torch.bfloat16)
    _, weights = read_adapter(tmp_path / "a")
    assert all(a.dtype == torch.float32 and b.dtype == torch.float32 for a, b in weights.values())
    assert all(float(b.abs().max()) > 0 for _, b in weights.values())  # B starts at zero: it trained
    assert all(w["train_loss_last"] == w["train_loss_last"] for w in report["windows"])  # finite, not NaN


def test_adapted_edge_runs_on_the_backends(adapted, tiny_dir):
    out, _, _ = adapted
    ids = [1, 5, 9, 13]

    def rows(kind, adapter):
        be = make_backend(kind, tiny_dir, **({"adapter": adapter} if adapter else {}))
        be.step(ids, 0, None)
        return be.take_split_rows()[1]

    want = rows("torch", out)
    assert (rows("bnb-int8", out) - want).abs().mean() < (rows("bnb-int8", None) - want).abs().mean()
    assert (rows("torch", None) - want).abs().max() > 1e-3  # the adapter is in effect


def test_recalibration_after_adaptation_travels_with_the_adapter(adapted, tiny_dir):
    """`coexit calibrate --adapter` fits the adapted edge's thresholds and writes them into the adapter directory,
    where EdgeClient.from_checkpoint(adapter=...) finds them; the model directory's own policy is untouched."""
    from edge.client import EdgeClient
    from edge.policy.calibrate import POLICY_FILE, calibrate

    out, _, d = adapted
    mine = (Path(tiny_dir) / POLICY_FILE).read_text() if (Path(tiny_dir) / POLICY_FILE).exists() else None
    r = calibrate(tiny_dir, d / "my_code.py", target=0.5, max_tokens=3000, adapter=out)
    assert (out / POLICY_FILE).is_file()
    assert ((Path(tiny_dir) / POLICY_FILE).read_text() if (Path(tiny_dir) / POLICY_FILE).exists() else None) == mine
    client = EdgeClient.from_checkpoint(tiny_dir, adapter=out, mode="standalone")
    assert client.policy.thresholds == {int(k): v for k, v in r["thresholds"].items()}


def test_calibrate_cli_judges_an_adapted_edge_against_the_text_by_default(adapted, tiny_dir):
    """`coexit calibrate --adapter DIR`: the target is measured against the user's text (teacher-forced, reference
    text) unless --reference cloud says otherwise; without --adapter the reference stays the cloud's token."""
    import json

    from edge.policy.calibrate import POLICY_FILE, main

    out, _, d = adapted
    args = ["--model", str(tiny_dir), "--data", str(d / "my_code.py"), "--target", "0.5", "--max-tokens", "2000"]
    assert main([*args, "--adapter", str(out)]) == 0
    written = json.loads((out / POLICY_FILE).read_text())
    assert written["reference"] == "text" and written["on_policy"] is False
    assert main([*args, "--adapter", str(out), "--reference", "cloud", "--teacher-forced"]) == 0
    assert json.loads((out / POLICY_FILE).read_text())["reference"] == "cloud"


def test_resume_keeps_the_saved_rank(tiny_dir, tmp_path):
    """An adapter begun at another rank than this run's default resumes at its own rank (its saved windows load)."""
    (tmp_path / "t.py").write_text(TEXT * 8)
    adapt(tiny_dir, [str(tmp_path / "t.py")], tmp_path / "a", steps=1, seq_len=16, batch=2, heldout=0.0,
          progress=False, r=4, alpha=8.0)
    again = adapt(tiny_dir, [str(tmp_path / "t.py")], tmp_path / "a", steps=1, seq_len=16, batch=2, heldout=0.0,
                  progress=False, joint_steps=1)
    cfg, weights = read_adapter(tmp_path / "a")
    assert [w.get("joint") for w in again["windows"]] == [True]
    assert cfg.r == 4 and cfg.alpha == 8.0 and all(a.shape[0] == 4 for a, _ in weights.values())
