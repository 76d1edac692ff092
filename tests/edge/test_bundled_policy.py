"""The bundled model with its own shipped policy (exit_policy.json: the learned gate, and the adaptive policy over
its frontier) in every mode, through the SDK and the CLI, against a real cloud. Lossless mode crashed with the
learned gate (#21): its tokens must be the full model's, token for token."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import coexit
from cloud.server import ServerThread
from coexit.decoding import generate_full
from edge.client import EdgeClient
from edge.policy.gate import GatePolicy

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "coexit-code-small"
PROMPT = "def read_file(path):\n    with open(path) as f:\n"
N = 24


@pytest.fixture(scope="module")
def full():
    return coexit.load(MODEL)


@pytest.fixture(scope="module")
def cloud(full):
    with ServerThread(full) as server:
        yield server.address


@pytest.fixture(scope="module")
def reference(full):
    """The full model's greedy continuation (what lossless mode must emit)."""
    ids = full.tokenizer.encode(PROMPT, add_bos=True)
    return generate_full(full, ids, N)


def test_shipped_policy_is_the_learned_gate(cloud):
    client = EdgeClient.from_checkpoint(MODEL, cloud=cloud)
    assert isinstance(client.policy, GatePolicy) and client.policy.criterion == "learned"
    client.close()


@pytest.mark.parametrize("policy", [None, "adaptive"], ids=["gate", "adaptive"])
def test_lossless_with_the_shipped_policy_is_the_full_model(cloud, reference, policy):
    client = EdgeClient.from_checkpoint(MODEL, cloud=cloud, mode="lossless", policy=policy)
    try:
        gen = client.generate(PROMPT, N, stop_at_eos=False)
    finally:
        client.close()
    assert [e.token_id for e in gen.events] == reference
    assert gen.counters.accepted > 0  # the gate's drafts were used, not only the cloud's tokens


@pytest.mark.parametrize("mode", ["collaborative", "standalone", "speculative"])
def test_other_modes_with_the_shipped_policy(cloud, full, mode):
    kw = {"policy": "adaptive"} if mode == "speculative" else {}  # collaborative + adaptive drafts fallbacks
    client = EdgeClient.from_checkpoint(MODEL, cloud=cloud if mode != "standalone" else None, encoding="fp32",
                                        mode="collaborative" if mode == "speculative" else mode, **kw)
    try:
        gen = client.generate(PROMPT, N, stop_at_eos=False)
    finally:
        client.close()
    origins = [e.origin for e in gen.events]
    assert len(gen.events) == N
    if mode == "standalone":
        assert set(origins) == {"edge"}
        return
    assert "edge" in origins and "cloud" in origins and set(origins) <= {"edge", "cloud"}
    # every token the cloud made is the full model's greedy token after the prefix the edge emitted
    ids = gen.prompt_ids + [e.token_id for e in gen.events]
    best = full(torch.tensor([ids])).logits[0].argmax(-1)
    for i, e in enumerate(gen.events):
        if e.origin == "cloud":
            assert e.token_id == int(best[len(gen.prompt_ids) + i - 1]), i


def test_cli_lossless_equals_cloud_only(cloud):
    def run(mode):
        r = subprocess.run([sys.executable, "-m", "coexit.cli", "generate", "--model", str(MODEL), "--cloud", cloud,
                            "--mode", mode, "--max-new-tokens", str(N), "--color", "never", PROMPT],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0 and not r.stderr.strip(), r.stderr
        return r.stdout

    import re

    lossless, cloud_only = run("lossless"), run("cloud-only")
    strip = lambda s: re.sub(r"\[(E\d+|C|S)\]", "", s.split("\n-- ")[0])  # noqa: E731
    assert strip(lossless) == strip(cloud_only)
    assert "[E" in lossless  # some tokens were accepted edge drafts
    summary = lossless.strip().splitlines()[-1]
    cloud_tokens = lossless.split("\n-- ")[0].count("[C]")
    assert f"{cloud_tokens} from the cloud" in summary


def test_demo_prompts_end_at_a_token_boundary(full):
    """A completion can start where each demo prompt ends: no trailing indentation (its spaces would be merged
    into the prompt's last token and the first generated token would add one more), and the prompt's tokens are a
    prefix of the tokens of the prompt with its greedy continuation, re-tokenized."""
    from edge.apps.demo import PROMPTS

    tok = full.tokenizer
    for prompt in PROMPTS:
        assert not prompt.endswith((" ", "\t")), prompt
        ids = tok.encode(prompt, add_bos=True)
        text = prompt + tok.decode(generate_full(full, ids, 8))
        assert tok.encode(text, add_bos=True)[:len(ids)] == ids, prompt


def test_demo_labels_each_run():
    r = subprocess.run([sys.executable, "-m", "coexit.cli", "demo", "--link", "none", "--max-new-tokens", "4",
                        "--color", "never"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "collaborative run: learned exit gate" in out and "adaptive run: network-aware" in out
    assert "the adaptive run's completions" in out
    assert "cloud-only run, for comparison" in r.stderr
    rows = [ln.split()[0] for ln in out.splitlines() if len(ln.split()) == 6 and ln.split()[0] in
            ("collaborative", "adaptive", "cloud-only")]
    assert rows == ["collaborative", "adaptive", "cloud-only"]
