"""Calibration picks, per exit in order, the lowest threshold whose accepted tokens meet the agreement target."""

from __future__ import annotations

import json

import torch

import coexit
from coexit.exits import ExitPolicy
from edge.calibrate import ExitStats, calibrate, choose_thresholds, load_policy


def test_thresholds_on_known_statistics():
    # exit 1: confident rows 0-59 all agree, rows 60-99 agree half the time
    conf1 = torch.linspace(1.0, 0.01, 100)
    agree1 = torch.ones(100, dtype=torch.bool)
    agree1[60::2] = False
    # exit 2: agrees everywhere
    conf2 = torch.full((100,), 0.5)
    agree2 = torch.ones(100, dtype=torch.bool)
    stats = ExitStats({1: conf1, 2: conf2}, {1: agree1, 2: agree2})
    thr, rep = choose_thresholds(stats, [1, 2], target=0.99, criterion="max_prob", min_support=5)
    assert thr[1] == float(conf1[59])  # rows 0-59 agree; adding row 60 (a miss) drops precision to 60/61 < 0.99
    assert rep["per_exit"][1]["share"] == 0.6 and thr[2] == 0.5
    assert rep["edge_share"] == 1.0 and rep["edge_agreement"] >= 0.99
    loose, rep2 = choose_thresholds(stats, [1], target=0.98, criterion="max_prob", min_support=5)
    assert loose[1] == float(conf1[61]) and abs(rep2["edge_share"] - 0.62) < 1e-6  # 61/62 >= 0.98, 61/63 is not


def test_calibrate_writes_a_policy_that_meets_the_target(tiny_dir, tmp_path):
    import shutil

    d = tmp_path / "ck"
    shutil.copytree(tiny_dir, d)
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n" for i in range(80)))
    result = calibrate(d, data, target=0.5, max_tokens=2000)
    policy = load_policy(d)
    assert policy is not None and {int(k) for k in result["thresholds"]} == set(policy.thresholds)
    # re-apply the written policy to the model's real logits: the accepted tokens meet the target
    model = coexit.load(d)
    ids = []
    for line in data.read_text().splitlines():
        ids += model.tokenizer.encode(json.loads(line)["text"], add_bos=True)
    ids = ids[:2000]
    taken = agree = 0
    with torch.no_grad():
        for a in range(0, len(ids) - 1, 256):
            out = model(torch.tensor([ids[a:a + 256]]), exits=[2, 3])
            final = out.logits[0].argmax(-1)
            for i in range(final.numel()):
                for e in (2, 3):
                    if policy.decide(e, out.exit_logits[e][0, i]):
                        taken += 1
                        agree += int(out.exit_logits[e][0, i].argmax() == final[i])
                        break
    assert taken / len(ids) == result["edge_share"] or abs(taken / len(ids) - result["edge_share"]) < 0.01
    if taken:
        assert agree / taken >= 0.5
    assert isinstance(policy, ExitPolicy)
