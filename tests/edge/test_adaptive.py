"""The network-aware policy: it never exceeds its quality budget on the calibration data whatever the network, it
loosens as fallbacks get expensive and tightens as they get cheap, `coexit calibrate` writes what it needs, and
a client measures a real emulated link and adapts to it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import coexit
from cloud.server import ServerThread
from coexit.exits import ExitPolicy
from coexit.tiny import SAMPLE_TEXT
from edge.apps.wan_emulator import DelayProxy
from edge.client import EdgeClient
from edge.policy.adaptive import AdaptivePolicy, evaluate, frontier
from edge.policy.calibrate import POLICY_FILE, calibrate, choose_thresholds, collect, load_policy

NETWORKS = [  # (round trip s, server compute s, queue s, bytes up)
    (0.0002, 0.0001, 0.0, 600), (0.002, 0.001, 0.0005, 600), (0.05, 0.002, 0.0, 900), (0.2, 0.002, 0.01, 900),
    (1.0, 0.005, 0.3, 600), (0.06, 0.001, 0.0, 40_000), (0.5, 0.001, 0.0, 400_000)]


@pytest.fixture(scope="module")
def stats(tiny_dir):
    model = coexit.load(tiny_dir)
    exits = [e for e in model.config.exit_layers if e <= model.config.split_layer]
    return model, exits, collect(model, SAMPLE_TEXT * 8, exits, "max_prob", seq_len=64, max_tokens=4000)


def test_frontier_is_pareto(stats):
    _, exits, st = stats
    points = frontier(st.conf, st.agree, exits)
    assert len(points) > 3
    for a, b in zip(points, points[1:]):
        assert a.disagreement <= b.disagreement and a.share < b.share
    for p in points:  # the stored figures are what the thresholds do on the data
        again = evaluate(st.conf, st.agree, exits, p.thresholds)
        assert again.disagreement == pytest.approx(p.disagreement) and again.share == pytest.approx(p.share)


@pytest.mark.parametrize("target", [0.99, 0.9, 0.7])
def test_never_exceeds_the_budget_on_calibration_data(stats, target):
    model, exits, st = stats
    fixed, _ = choose_thresholds(st, exits, target, "max_prob")
    budget = evaluate(st.conf, st.agree, exits, fixed).disagreement
    policy = AdaptivePolicy({}, points=frontier(st.conf, st.agree, exits), budget=budget,
                            split=model.config.split_layer)
    shares = []
    for net in NETWORKS * 2:
        policy.observe(*net)
        # recomputed from the raw statistics, not read from the frontier point
        used = evaluate(st.conf, st.agree, exits, policy.thresholds)
        assert used.disagreement <= budget + 1e-12
        shares.append(used.share)
    # the fixed policy is one of the settings within the budget, so over an expensive link the adaptive one
    # exits at least as often
    slow = AdaptivePolicy({}, points=policy.points, budget=budget, split=model.config.split_layer)
    for _ in range(5):
        slow.observe(0.2, 0.002, 0.0, 900)
    assert evaluate(st.conf, st.agree, exits, slow.thresholds).share >= \
        evaluate(st.conf, st.agree, exits, fixed).share - 1e-12


def test_looser_when_fallbacks_are_expensive(stats):
    model, exits, st = stats
    points = frontier(st.conf, st.agree, exits)
    budget = points[len(points) // 2].disagreement

    def settle(net) -> AdaptivePolicy:
        p = AdaptivePolicy({}, points=points, budget=budget, split=model.config.split_layer)
        for _ in range(10):
            p.observe(*net)
        return p

    cheap, dear = settle((0.0003, 0.0002, 0.0, 600)), settle((0.2, 0.002, 0.0, 600))
    assert dear.current.share > cheap.current.share
    assert cheap.current.disagreement < dear.current.disagreement <= budget
    # the rule: the least disagreement among the settings within 5% of the fastest one
    costs = {id(p): dear.latency(p) for p in dear.admissible}
    best = min(costs.values())
    near = [p for p in dear.admissible if costs[id(p)] <= best + max(0.05 * best, 0.0002)]
    assert dear.current.disagreement == min(p.disagreement for p in near)
    assert costs[id(dear.current)] <= 1.05 * best


def test_calibrate_writes_the_frontier_and_clients_load_it(tiny_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    data = tmp_path / "heldout.txt"
    data.write_text("\n".join(SAMPLE_TEXT * 8))
    report = calibrate(d, data, target=0.9, max_tokens=3000)
    saved = json.loads((d / POLICY_FILE).read_text())
    assert saved["frontier"] and saved["disagreement"] == report["disagreement"]
    policy = load_policy(d, adaptive=True)
    assert isinstance(policy, AdaptivePolicy) and policy.budget == saved["disagreement"]
    assert load_policy(d, adaptive=True, quality_budget=0.5).budget == 0.5
    client = EdgeClient.from_checkpoint(d, policy="adaptive", quality_budget=0.05, mode="standalone")
    assert isinstance(client.policy, AdaptivePolicy) and client.policy.budget == 0.05
    (d / POLICY_FILE).unlink()
    with pytest.raises(FileNotFoundError):
        load_policy(d, adaptive=True)


def test_a_client_measures_the_link_and_loosens(tiny_dir, stats):
    model, exits, st = stats
    points = frontier(st.conf, st.agree, exits)
    budget = points[len(points) // 2].disagreement
    full = coexit.load(tiny_dir)
    from edge.backends import TorchBackend

    with ServerThread(full) as srv:
        host, port = srv.address.rsplit(":", 1)
        proxy = DelayProxy(host, int(port), 60, 20)
        chosen = {}
        for name, address in (("loopback", srv.address), ("wan", proxy.start())):
            policy = AdaptivePolicy({}, points=points, budget=budget, split=model.config.split_layer)
            client = EdgeClient(TorchBackend.from_checkpoint(tiny_dir), full.tokenizer, cloud=address, policy=policy)
            client.generate("def add(a, b):", 12, stop_at_eos=False)  # starts strict: fallbacks measure the link
            client.generate("for i in range(10):", 12, stop_at_eos=False)
            client.close()
            chosen[name] = policy.current
            assert policy.net.rtt_s is not None
            if name == "wan":
                assert 0.04 < policy.net.rtt_s < 0.2  # the relay's 60 ms, measured
        proxy.stop()
    assert chosen["wan"].share >= chosen["loopback"].share
    assert chosen["wan"].disagreement <= budget
    assert torch.isfinite(torch.tensor(chosen["wan"].share))


class AlwaysSpeculate(AdaptivePolicy):
    def speculate(self) -> bool:
        return True


@pytest.mark.parametrize("thresholds", [{2: 0.3, 3: 0.2}, {3: 0.15}, {}])
def test_speculative_fallbacks_make_collaborative_tokens(tiny_dir, served, thresholds):
    """Collaborative mode with the adaptive policy drafts through fallbacks when they are expensive: with one
    setting on its frontier (so thresholds stay put) its greedy tokens equal plain collaborative mode's with the
    same thresholds, and no token waited for the cloud."""
    from edge.backends import TorchBackend
    from edge.policy.adaptive import FrontierPoint

    full = coexit.load(tiny_dir)
    ids = full.tokenizer.encode("import os\nimport sys\n\nclass Point:\n", add_bos=True)
    point = FrontierPoint(dict(thresholds), {}, 0.0)
    client = EdgeClient(TorchBackend.from_checkpoint(tiny_dir), full.tokenizer, cloud=served.address)
    plain = client.generate(ids, 20, policy=ExitPolicy(thresholds), stop_at_eos=False)
    spec = client.generate(ids, 20, policy=AlwaysSpeculate({}, points=[point], budget=0.0, split=3),
                           stop_at_eos=False)
    client.close()
    assert spec.tokens == plain.tokens
    assert [e.origin for e in spec.events if e.exit_layer < 3] == [e.origin for e in plain.events
                                                                    if e.exit_layer < 3]
    c = spec.counters
    assert c.fallbacks == 0 and c.drafts > 0 and c.accepted + c.rejected <= c.drafts


def test_speculative_mode_keeps_collaborative_outage_semantics(tiny_dir):
    """Kill the cloud mid-generation and restart it: the speculative run carries on alone (edge-standalone), never
    changes an emitted token, and once the cloud is back its tokens are the full model's again."""
    from cloud.launch import free_port, start_cloud
    from coexit.decoding import generate_full
    from edge.backends import TorchBackend
    from edge.policy.adaptive import FrontierPoint
    from tests.edge.cloud_restart import assert_full_model_greedy, drive_through_restart

    full = coexit.load(tiny_dir)
    port = free_port()
    proc, _ = start_cloud(tiny_dir, port)
    policy = AlwaysSpeculate({}, points=[FrontierPoint({}, {}, 0.0)], budget=0.0, split=3)
    client = EdgeClient(TorchBackend.from_checkpoint(tiny_dir), full.tokenizer, cloud=f"127.0.0.1:{port}",
                        deadline_s=2.0, retry_s=0.3, policy=policy)
    ids = full.tokenizer.encode("class Point:\n    def __init__(self, x, y):", add_bos=True)
    run = client.stream(ids, 30, stop_at_eos=False)
    events = drive_through_restart(run, client, tiny_dir, port, proc)
    origins = [e.origin for e in events]
    assert len(events) == 30
    assert [e.token_id for e in events[:8]] == generate_full(full, ids, 8)
    assert "edge-standalone" in origins[8:15] and origins[-1] != "edge-standalone"
    assert run.counters.sessions_opened == 2
    back = max(i for i, o in enumerate(origins) if o == "edge-standalone") + 1
    assert_full_model_greedy(full, ids, events, events[back:])  # verified by the restarted cloud
