"""Exit voting (edge/policy/voting.py): the rules on known numbers, and a collaborative run whose split exit emits
the vote of the edge exits: every edge token is the vote's argmax over the model's own exit distributions."""

from __future__ import annotations

import pytest
import torch

import coexit
from cloud.server import ServerThread
from edge.backends import TorchBackend
from edge.client import EdgeClient
from edge.policy.voting import VotingPolicy, combine


def test_rules():
    a, b = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.1, 0.6, 0.3])
    torch.testing.assert_close(combine([a, b], "max"), torch.tensor([0.7, 0.6, 0.3]) / 1.6)
    torch.testing.assert_close(combine([a, b], "mean"), torch.tensor([0.4, 0.4, 0.2]))
    torch.testing.assert_close(combine([a, b], "weighted"), (0.7 * a + 0.6 * b) / 1.3)
    with pytest.raises(ValueError, match="voting rule"):
        combine([a], "median")


@pytest.mark.parametrize("rule", ["max", "mean", "weighted"])
def test_edge_tokens_are_the_vote(tiny_dir, rule):
    full = coexit.load(tiny_dir)
    cfg = full.config
    exits, split = tuple(cfg.edge_exit_layers), cfg.split_layer
    policy = VotingPolicy({split: 0.0}, "max_prob", exits=exits, rule=rule)  # always take the vote at the split
    with ServerThread(full) as server:
        client = EdgeClient(TorchBackend.from_checkpoint(tiny_dir), full.tokenizer, cloud=server.address,
                            policy=policy)
        gen = client.generate("def add(a, b):", 12, stop_at_eos=False)
        client.close()
    assert {e.origin for e in gen.events} == {"edge"} and {e.exit_layer for e in gen.events} == {split}
    ids = gen.prompt_ids + gen.tokens
    with torch.no_grad():
        out = full(torch.tensor([ids]), exits=list(exits))
    n, differs = len(gen.prompt_ids), 0
    for i, e in enumerate(gen.events):
        probs = [torch.softmax(out.exit_logits[x][0, n + i - 1].float(), -1) for x in exits]
        assert e.token_id == int(combine(probs, rule).argmax()), i
        differs += e.token_id != int(probs[-1].argmax())
    assert differs  # somewhere the vote is not simply the split exit's choice
