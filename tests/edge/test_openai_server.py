"""`coexit edge-serve` as a real process in front of a real cloud, driven by the official `openai` client:
completions and chat, streamed and not, equal EdgeClient.generate for the same settings; stop strings, seeds,
per-request mode overrides, per-token origins, concurrent requests, and 400s for bad requests."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request

import openai
import pytest

import coexit
from cloud.launch import free_port, start_cloud
from coexit.exits import ExitPolicy
from coexit.sampling import GREEDY, SamplingParams
from edge.backends import TorchBackend
from edge.client import EdgeClient

PROMPTS = ["def add(a, b):", "import os\nimport sys\n", "for i in range(10):", "class Point:"]
THRESHOLDS = {2: 0.3, 3: 0.2}


@pytest.fixture(scope="module")
def stack(tiny_dir):
    cloud, address = start_cloud(tiny_dir)
    port = free_port()
    edge = subprocess.Popen([sys.executable, "-m", "coexit.cli", "edge-serve", "--model", str(tiny_dir), "--cloud",
                             address, "--port", str(port), "--thresholds", "2=0.3,3=0.2", "--encoding", "fp32",
                             "--parallel", "4", "--model-name", "tiny"])
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            break
        except OSError:
            if edge.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("coexit edge-serve did not come up") from None
            time.sleep(0.3)
    reference = EdgeClient(TorchBackend.from_checkpoint(tiny_dir), coexit.load(tiny_dir).tokenizer, cloud=address,
                           policy=ExitPolicy(THRESHOLDS))
    yield openai.OpenAI(base_url=base + "/v1", api_key="unused"), reference
    reference.close()
    edge.terminate()
    edge.wait(10)
    cloud.kill()
    cloud.wait()


def test_models(stack):
    api, _ = stack
    assert [m.id for m in api.models.list().data] == ["tiny"]


@pytest.mark.parametrize("stream", [False, True])
def test_completions_equal_edge_client(stack, stream):
    api, ref = stack
    for prompt in PROMPTS[:2]:
        want = ref.generate(prompt, 12, GREEDY, stop_at_eos=True)
        if stream:
            chunks = list(api.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                                 stream=True))
            text = "".join(c.choices[0].text for c in chunks)
            tokens = [t for c in chunks for t in c.model_extra["coexit"]["tokens"]]
            assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        else:
            r = api.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
            text, tokens = r.choices[0].text, r.model_extra["coexit"]["tokens"]
            assert r.usage.completion_tokens == len(want.events)
        assert text == want.text
        assert [t["id"] for t in tokens] == want.tokens
        assert [t["origin"] for t in tokens] == [e.origin for e in want.events]
        assert [t["exit_layer"] for t in tokens] == [e.exit_layer for e in want.events]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_edge_client(stack, stream):
    api, ref = stack
    messages = [{"role": "system", "content": "# utilities"}, {"role": "user", "content": PROMPTS[2]}]
    want = ref.generate("# utilities\n" + PROMPTS[2] + "\n", 10, SamplingParams(0.8, 0, 0.9, 7))
    kw = dict(model="tiny", messages=messages, max_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    if stream:
        chunks = list(api.chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        r = api.chat.completions.create(**kw)
        text = r.choices[0].message.content
        assert r.choices[0].message.role == "assistant"
    assert text == want.text


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(stack, stream):
    api, ref = stack
    full = ref.generate(PROMPTS[3], 16, GREEDY).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop and stop in full
    if stream:
        chunks = list(api.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=16, temperature=0,
                                             stop=[stop], stream=True))
        text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        r = api.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=16, temperature=0, stop=stop)
        text, finish = r.choices[0].text, r.choices[0].finish_reason
    assert text == full[:full.index(stop)] and finish == "stop"


def test_mode_override_and_concurrency(stack):
    api, ref = stack
    results, errors = {}, []

    def one(i: int) -> None:
        try:
            prompt = PROMPTS[i % len(PROMPTS)]
            mode = "cloud-only" if i % 2 else "collaborative"
            r = api.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                       extra_body={"coexit": {"mode": mode}})
            results[i] = (prompt, mode, r.choices[0].text, [t["origin"] for t in r.model_extra["coexit"]["tokens"]])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8
    for prompt, mode, text, origins in results.values():
        assert text == ref.generate(prompt, 10, GREEDY, mode=mode).text
        if mode == "cloud-only":
            assert set(origins) == {"cloud"}


def test_bad_requests(stack):
    api, _ = stack
    bad = [dict(prompt="x", n=2), dict(prompt="", max_tokens=4), dict(prompt="x", max_tokens=0),
           dict(prompt="x", stop=["a", "b", "c", "d", "e"]), dict(prompt="x", extra_body={"coexit": {"mode": "nope"}}),
           dict(prompt="x", extra_body={"coexit": {"policy": "adaptive"}})]  # this model was never calibrated
    for kw in bad:
        with pytest.raises(openai.BadRequestError):
            api.completions.create(model="tiny", **kw)
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model="tiny", messages=[])
