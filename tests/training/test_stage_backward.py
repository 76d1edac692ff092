"""A pipeline stage with an exit head back-propagates its layers once, even though DeepSpeed calls backward
separately for each tensor the stage sends (hidden state, then carried exit losses), and the gradients equal
those of one joint backward."""

from __future__ import annotations

import torch

from coexit.config import Config
from training.stages import PipeStage, StagePlan


def test_stage_backward_runs_once_and_matches_joint_backward():
    cfg = Config.flavour("tiny")  # exits 2, 3, 4
    plan = StagePlan(cfg, [(0, 3), (3, 6)], "pretrain", None, seed=0,
                     exit_index={e: i for i, e in enumerate(cfg.exit_layers)})
    stage = PipeStage(plan, 0)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    calls = []
    stage.model.layers["0"].mlp.up_proj.weight.register_hook(lambda g: calls.append(1) if g is not None else None)
    g_h, g_l = torch.randn(2, 8, cfg.hidden_size), torch.tensor([0.3, 0.5, 0.7])

    hidden, losses, _ = stage((ids, ids))
    hidden.backward(g_h, retain_graph=True)  # what DeepSpeed's _exec_backward_pass does
    losses.backward(g_l)
    split = {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}
    assert len(calls) == 1, f"layer 0 was back-propagated {len(calls)} times"

    stage.zero_grad()
    hidden, losses, _ = stage((ids, ids))
    torch.autograd.backward((hidden, losses), (g_h, g_l))
    assert len(calls) == 2
    joint = {n: p.grad for n, p in stage.named_parameters() if p.grad is not None}
    assert set(split) == set(joint) and "exits.2.norm.weight" in joint and "lm_head.weight" in joint
    for n in joint:
        torch.testing.assert_close(split[n], joint[n], atol=1e-7, rtol=0)
