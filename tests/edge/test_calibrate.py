"""Calibration picks, per exit in order, the lowest threshold whose accepted tokens meet the agreement target."""

from __future__ import annotations

import json

import torch

import coexit
from coexit.exits import ExitPolicy
from edge.policy.calibrate import ExitStats, calibrate, choose_thresholds, load_policy


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


def test_clopper_pearson_bounds():
    from edge.policy.guarantee import binom_cdf, clopper_pearson_upper

    assert abs(clopper_pearson_upper(0, 100, 0.05) - (1 - 0.05 ** (1 / 100))) < 1e-6  # closed form at m = 0
    for m, n in ((3, 50), (10, 400), (40, 1000)):
        u = clopper_pearson_upper(m, n, 0.05)
        assert abs(binom_cdf(m, n, u) - 0.05) < 1e-4 and u > m / n


def test_ltt_guarantee_holds_over_repeated_calibrations():
    """Scores whose true disagreement rate falls with confidence: over 200 fresh calibration samples, the chosen
    threshold's true disagreement exceeds alpha in at most about delta of them, while the empirical rule (no bound)
    exceeds it far more often; and the bound still finds a threshold nearly every time."""
    from edge.policy.guarantee import ltt_threshold

    alpha, delta, n, trials = 0.05, 0.1, 3000, 200
    g = torch.Generator().manual_seed(0)

    def true_rate(t: float) -> float:  # disagreement P(wrong | score >= t) for score ~ U(0, 1), P(wrong|s) = 0.3(1-s)
        return 0.15 * (1 - t)

    bad_ltt = bad_plain = found = 0
    for _ in range(trials):
        s = torch.rand(n, generator=g)
        agree = torch.rand(n, generator=g) >= 0.3 * (1 - s)
        t, _ = ltt_threshold(s, agree, alpha, delta)
        found += t is not None
        bad_ltt += t is not None and true_rate(t) > alpha
        stats = ExitStats({1: s}, {1: agree})
        plain, _ = choose_thresholds(stats, [1], target=1 - alpha, criterion="max_prob")
        bad_plain += 1 in plain and true_rate(plain[1]) > alpha
    assert found >= 0.9 * trials  # it has power
    assert bad_ltt <= delta * trials + 8
    assert bad_plain > 2 * bad_ltt + 10


def test_on_policy_learned_gate_with_guarantee(tiny_dir, tmp_path):
    """`--criterion learned` on on-policy data: the gates are written beside the policy, load_policy builds the
    gate policy from both, and an EdgeClient from the checkpoint uses it; the policy file states its guarantee."""
    import shutil

    from coexit.tiny import SAMPLE_TEXT
    from edge.client import EdgeClient
    from edge.policy.gate import GATE_FILE, GatePolicy

    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    data = tmp_path / "held.txt"
    data.write_text("\n".join(SAMPLE_TEXT * 20))
    r = calibrate(d, data, target=0.5, criterion="learned", max_tokens=1500, on_policy=True, delta=0.1)
    saved = json.loads((d / "exit_policy.json").read_text())
    assert saved["criterion"] == "learned" and saved["on_policy"] is True
    assert saved["guarantee"]["confidence"] == 0.9 and (d / GATE_FILE).is_file()
    policy = load_policy(d)
    assert isinstance(policy, GatePolicy) and set(policy.gates) == {2, 3}
    for v in r["per_exit"].values():  # every chosen exit's stated bound is within the target
        if v["threshold"] is not None:
            assert v["upper_bound"] <= 0.5
    client = EdgeClient.from_checkpoint(d, mode="standalone")
    assert isinstance(client.policy, GatePolicy)
    gen = client.generate("def add(a, b):", 8, stop_at_eos=False)
    assert len(gen.events) == 8
    # the network-aware policy still works from a learned calibration: max-prob settings within their budget
    from edge.policy.adaptive import AdaptivePolicy

    adaptive = load_policy(d, adaptive=True)
    assert isinstance(adaptive, AdaptivePolicy) and adaptive.criterion == "max_prob"
    assert adaptive.budget == saved["adaptive"]["disagreement"]
    assert adaptive.admissible and all(p.disagreement <= adaptive.budget for p in adaptive.admissible)


def test_coexit_generate_uses_the_calibrated_policy_unless_told_otherwise(tiny_dir, tmp_path, capsys):
    """`coexit generate` runs the model's exit_policy.json by default; --threshold(s) or --policy fixed give a
    fixed policy, and a model without a calibration falls back to 0.9 at every edge exit."""
    import shutil

    from edge.apps import generate as cli
    from edge.policy.calibrate import POLICY_FILE

    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    (d / POLICY_FILE).unlink(missing_ok=True)

    def policy_of(*flags):
        return cli.choose_policy(cli.parser().parse_args(["--model", str(d), *flags, "def f():"]))

    split = coexit.read_config(d).split_layer
    edge_exits = [e for e in coexit.read_config(d).exit_layers if e <= split]
    assert policy_of().thresholds == {e: 0.9 for e in edge_exits}  # nothing calibrated yet
    (d / POLICY_FILE).write_text(json.dumps({"criterion": "margin", "thresholds": {str(split): 0.25}}))
    calibrated = policy_of()
    assert calibrated.thresholds == {split: 0.25} and calibrated.criterion == "margin"
    assert policy_of("--threshold", "0.5").thresholds == {e: 0.5 for e in edge_exits}
    assert policy_of("--thresholds", "2=0.7").thresholds == {2: 0.7}
    assert policy_of("--policy", "fixed").thresholds == {e: 0.9 for e in edge_exits}
    assert cli.main(["--model", str(d), "--mode", "standalone", "--max-new-tokens", "3", "--color", "never",
                     "def f():"]) == 0
    assert "3 tokens: 100% on the edge" in capsys.readouterr().out


def test_reference_text_judges_exits_against_the_next_token(tiny_dir, tmp_path):
    """--reference text: an exited token is acceptable unless the final head had the real next token and the exit
    did not; so every position that agrees with the final head is acceptable, and the acceptable ones are exactly
    those the formula names (checked against the model's own logits)."""
    import pytest

    from coexit.errors import UsageError
    from edge.policy.calibrate import collect

    model = coexit.load(tiny_dir, dtype=torch.float32)
    texts = [f"def g{i}(y):\n    return y + {i}\n" for i in range(30)]
    cloud = collect(model, texts, [2, 3], "max_prob", seq_len=64, max_tokens=600)
    text = collect(model, texts, [2, 3], "max_prob", seq_len=64, max_tokens=600, reference="text")
    ids = []
    for t in texts:
        ids += model.tokenizer.encode(t, add_bos=True)
    ids = ids[:600]
    n = len(ids) - 1  # every position with a next token
    with torch.no_grad():
        want = {2: [], 3: []}
        for a in range(0, len(ids) - 1, 64):
            x = torch.tensor([ids[a:a + 64]])
            real = torch.tensor(ids[a + 1:a + 65])
            out = model(x, exits=[2, 3])
            final = out.logits[0, :real.numel()].argmax(-1)
            for e in (2, 3):
                mine = out.exit_logits[e][0, :real.numel()].argmax(-1)
                want[e].append((mine == real) | (final != real))
    for e in (2, 3):
        assert text.agree[e].numel() == n and torch.equal(text.agree[e], torch.cat(want[e]))
        assert bool((text.agree[e] | ~cloud.agree[e][:n]).all())  # agreement with the cloud implies acceptable
        assert torch.allclose(text.conf[e], cloud.conf[e][:n])
    assert int(text.agree[2].sum()) > int(cloud.agree[2][:n].sum())  # and some exits are right where the cloud is not
    data = tmp_path / "held.txt"
    data.write_text("".join(texts))
    with pytest.raises(UsageError):
        calibrate(tiny_dir, data, target=0.5, max_tokens=500, write=False, on_policy=True, reference="text")
    r = calibrate(tiny_dir, data, target=0.5, max_tokens=500, write=False, reference="text")
    assert r["reference"] == "text"


def test_on_policy_batches_equal_one_prompt_at_a_time(tiny_dir):
    """collect_on_policy decodes equal-length prompts together and reads the stats on the way: its tokens are
    generate_full's of each prompt alone, and its stats those of a full pass over each prompt and its continuation
    (the rows that produced the continuation), in its order (batches of equal-length prompts, step-major)."""
    from coexit.decoding import generate_full
    from edge.policy.calibrate import collect_on_policy, exit_pass, on_policy_prompts
    from edge.policy.gate import features as gate_features

    model = coexit.load(tiny_dir, dtype=torch.float32)
    texts = [f"def f{i}(x):\n    y = x * {i} + {i % 7}\n    return y - {i}\n" * 3 for i in range(12)]
    exits, new = [2, 3], 6
    room = model.config.max_position_embeddings - new
    prompts = on_policy_prompts(model.tokenizer, texts, 10, 16, room, seed=0)
    assert len({len(p) for p in prompts}) > 1  # prompts of several lengths: several batches
    got = collect_on_policy(model, texts, exits, "max_prob", max_tokens=10 * new, new_tokens=new, prompt_tokens=16,
                            batch=3, features=True)
    conf, agree, feats = {e: [] for e in exits}, {e: [] for e in exits}, {e: [] for e in exits}
    groups: dict[int, list[list[int]]] = {}  # by length, in order of first appearance, as collect_on_policy takes them
    for p in prompts:
        groups.setdefault(len(p), []).append(p)
    for group in groups.values():
        for b in range(0, len(group), 3):
            passes = []
            for p in group[b:b + 3]:
                gen = generate_full(model, p, new)
                rows = torch.arange(len(p) - 1, len(p) - 1 + new)
                logits, hidden, final = exit_pass(model, torch.tensor([p + gen]), exits)
                assert torch.equal(final[rows].argmax(-1), torch.tensor(gen))  # the rows that produced it
                passes.append(({e: logits[e][rows] for e in exits}, {e: hidden[e][rows] for e in exits}, final[rows]))
            for step in range(new):  # step-major: every prompt's row of this step
                lgs = {e: torch.stack([lg[e][step] for lg, _, _ in passes]) for e in exits}
                hs = {e: torch.stack([h[e][step] for _, h, _ in passes]) for e in exits}
                top, prev_top, prev_h = torch.stack([f[step] for _, _, f in passes]).argmax(-1), None, None
                for e in exits:
                    agree[e].append(lgs[e].argmax(-1) == top)
                    conf[e].append(torch.softmax(lgs[e], -1).max(-1).values)
                    feats[e].append(gate_features(lgs[e], hs[e], prev_top, prev_h))
                    prev_top, prev_h = lgs[e].argmax(-1), hs[e]
    for e in exits:
        assert got.agree[e].numel() == len(prompts) * new
        assert torch.equal(got.agree[e], torch.cat(agree[e]))
        assert torch.allclose(got.conf[e], torch.cat(conf[e]), atol=1e-5)
        assert torch.allclose(got.feats[e], torch.cat(feats[e]), atol=1e-4)
