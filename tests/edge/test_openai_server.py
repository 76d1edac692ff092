"""`coexit edge-serve` as a real process in front of a real cloud, driven by the official `openai` client:
completions and chat, streamed and not, equal EdgeClient.generate for the same settings; stop strings, seeds,
per-request mode overrides, per-token origins, concurrent requests, and 400s for bad requests.

OpenAI's details (#21): the context in /v1/models and 400 context_length_exceeded (before any stream starts), 404
for an unknown model, 400 naming each unsupported or out-of-range field, tokens that line up with each chunk's text
under stop strings, 503s that say what to do when the cloud fails; the server's flags (in-process, and as a process
whose bad flags end in one line); lossless mode with the bundled model's own learned-gate policy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from aiohttp import web

import coexit
from cloud.launch import free_port, start_cloud
from coexit.errors import UsageError
from coexit.exits import ExitPolicy
from coexit.sampling import GREEDY, SamplingParams
from edge.apps.openai_server import EdgeServer, parser, server_from_args
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


# ---- OpenAI's details (#21): context limits, unknown models, refused options, stop strings, flags, the cloud ----
ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "models" / "coexit-code-small"


def http(base: str, path: str, body: dict | None = None) -> tuple[int, str, dict | str]:
    """(status, content type, JSON body or text) of a GET (no body) or a POST."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base.rstrip("/") + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, ctype, raw = r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as exc:
        status, ctype, raw = exc.code, exc.headers["Content-Type"], exc.read()
    return status, ctype, json.loads(raw) if ctype.startswith("application/json") else raw.decode()


def error(status: int, message_has: list[str], param, code=None, kind: str = "invalid_request_error"):
    """A checker of an OpenAI-shaped error answer."""
    def check(answer) -> None:
        got, ctype, body = answer
        assert (got, ctype.split(";")[0]) == (status, "application/json"), answer
        e = body["error"]
        assert (e["type"], e["param"], e["code"]) == (kind, param, code), e
        assert all(w in e["message"] for w in message_has), e["message"]
    return check


@contextlib.contextmanager
def serving(server: EdgeServer):
    """An EdgeServer's app on a free loopback port, run by its own event loop on a thread; yields the base URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(server.app())
    port = free_port()
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def edge_serve(*flags: str) -> EdgeServer:
    """`coexit edge-serve FLAGS` as main() builds it, without binding a port."""
    return server_from_args(parser().parse_args(list(flags)))


def test_models_report_the_context(stack):
    api, _ = stack
    status, _, body = http(str(api.base_url), "/models")
    assert status == 200 and [(m["id"], m["max_model_len"], m["context_length"]) for m in body["data"]] == \
        [("tiny", 256, 256)]


@pytest.mark.parametrize("stream", [False, True])
def test_context_length_is_a_400(stack, stream):
    api, ref = stack
    base, tok = str(api.base_url), ref.tokenizer
    prompt = "def add(a, b):\n" * 28
    n = len(tok.encode(prompt, add_bos=True))
    assert 200 < n < 256
    long_prompt = prompt * 2
    assert len(tok.encode(long_prompt, add_bos=True)) > 256
    common = {"model": "tiny", "temperature": 0, "stream": stream}
    for path, body, param, words in [
            ("/completions", {"prompt": long_prompt, "max_tokens": 4}, "prompt", ["256"]),
            ("/completions", {"prompt": [5] * 300, "max_tokens": 4}, "prompt", ["300 tokens", "256"]),
            ("/chat/completions", {"messages": [{"role": "user", "content": long_prompt}]}, "messages", ["256"]),
            ("/completions", {"prompt": "x", "max_tokens": 100_000_000}, "max_tokens", ["100000000", "256"]),
            ("/completions", {"prompt": prompt, "max_tokens": 257 - n}, "max_tokens", [f"{n} tokens", str(256 - n)]),
    ]:
        error(400, words, param, "context_length_exceeded")(http(base, path, {**common, **body}))
    # exactly the context: served
    status, ctype, body = http(base, "/completions", {**common, "prompt": prompt, "max_tokens": 256 - n})
    assert status == 200 and ctype.startswith("text/event-stream" if stream else "application/json")


def test_unknown_model_is_a_404(stack):
    api, _ = stack
    base = str(api.base_url)
    for path, body in [("/completions", {"prompt": "x"}), ("/chat/completions", {"messages": [{"content": "x"}]})]:
        for stream in (False, True):
            error(404, ["'gpt-4' does not exist", "serves 'tiny'"], "model", "model_not_found")(
                http(base, path, {**body, "model": "gpt-4", "stream": stream, "max_tokens": 1}))
        assert http(base, path, {**body, "max_tokens": 1})[0] == 200  # no model field: the served one
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="gpt-4", prompt="x", max_tokens=1)


REFUSED = [  # (endpoint, fields, param named in the answer, words of the message)
    ("completions", {"logprobs": 1}, "logprobs", ["coexit.tokens"]),
    ("chat", {"logprobs": True}, "logprobs", ["coexit.tokens"]),
    ("chat", {"logprobs": False, "top_logprobs": 2}, "top_logprobs", ["coexit.tokens"]),
    ("completions", {"echo": True}, "echo", ["echo"]),
    ("completions", {"n": 2}, "n", ["one choice per request"]),
    ("chat", {"n": 3}, "n", ["one choice per request"]),
    ("completions", {"best_of": 2}, "best_of", ["one choice"]),
    ("completions", {"suffix": "}"}, "suffix", ["insertion"]),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", ["tool calling"]),
    ("chat", {"functions": [{"name": "f"}]}, "functions", ["tool calling"]),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format", ["plain text"]),
    ("completions", {"logit_bias": {"5": 100}}, "logit_bias", ["temperature, top_p"]),
    ("completions", {"presence_penalty": 0.5}, "presence_penalty", ["temperature, top_p"]),
    ("chat", {"frequency_penalty": -1}, "frequency_penalty", ["temperature, top_p"]),
    ("completions", {"temperature": -0.5}, "temperature", ["[0, 2]", "-0.5"]),
    ("completions", {"temperature": 2.5}, "temperature", ["[0, 2]"]),
    ("completions", {"temperature": "hot"}, "temperature", ["[0, 2]"]),
    ("completions", {"top_p": 0}, "top_p", ["(0, 1]"]),
    ("completions", {"top_p": 1.5}, "top_p", ["(0, 1]"]),
    ("completions", {"max_tokens": True}, "max_tokens", ["positive integer"]),
    ("completions", {"stream_options": {"include_usage": True}}, "stream_options", ["stream: true"]),
    ("completions", {"prompt": [5, 100_000]}, "prompt", ["vocabulary"]),
    ("completions", {"coexit": {"mode": "collaborative", "treshold": 0.9}}, "coexit", ["'treshold'", "thresholds"]),
    ("completions", {"coexit": {"thresholds": {"4": 0.9}}}, "coexit", ["layer 4", "edge exits are 2, 3"]),
    ("chat", {"coexit": {"thresholds": {"1": 0.5, "2": 0.5}}}, "coexit", ["layer 1", "2, 3"]),
    ("completions", {"coexit": {"threshold": 1.5}}, "coexit", ["[0, 1]", "1.5"]),
    ("completions", {"coexit": {"threshold": 0.5, "thresholds": {"2": 0.5}}}, "coexit", ["not both"]),
    ("completions", {"coexit": {"policy": "calibrated", "threshold": 0.5}}, "coexit", ["drop coexit.policy"]),
    ("completions", {"coexit": {"quality_budget": 0.1}}, "coexit", ["adaptive"]),
    ("completions", {"coexit": {"policy": "calibrated"}}, "coexit", ["no calibrated policy"]),  # tiny: none
]


@pytest.mark.parametrize("endpoint,fields,param,words", REFUSED, ids=[f"{e}-{p}-{i}" for i, (e, _, p, _) in
                                                                        enumerate(REFUSED)])
def test_unsupported_or_bad_fields_are_refused(stack, endpoint, fields, param, words):
    api, _ = stack
    body = {"model": "tiny", "max_tokens": 2, **fields}
    body.setdefault("messages" if endpoint == "chat" else "prompt", [{"role": "user", "content": "x"}]
                    if endpoint == "chat" else "x")
    path = "/chat/completions" if endpoint == "chat" else "/completions"
    error(400, words, param)(http(str(api.base_url), path, body))


def test_neutral_values_of_unsupported_fields_pass(stack):
    api, _ = stack
    neutral = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None, "logit_bias": {},
               "presence_penalty": 0, "frequency_penalty": 0.0, "top_k": -1, "user": "me"}
    status, _, body = http(str(api.base_url), "/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2,
                                                               **neutral})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1
    status, _, body = http(str(api.base_url), "/chat/completions", {
        "model": "tiny", "max_tokens": 2, "logprobs": False, "tools": [], "response_format": {"type": "text"},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "def "}, {"type": "text", "text": "f"}]}],
        "coexit": {"thresholds": {"2": 0.5, "3": 0.5}}})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


def stop_cases(events) -> dict[str, tuple[str, int]]:
    """name -> (stop string, tokens returned) for a greedy continuation's events: "inside" starts inside a token and
    ends in the next (the cut token is returned: part of its text is), "at-token" starts where a token's text
    starts, right after tokens without text of their own (they go with it: none of them is returned)."""
    texts = [e.text for e in events]
    starts = [sum(map(len, texts[:i])) for i in range(len(texts))]
    full = "".join(texts)
    i = next(i for i in range(1, len(texts) - 1) if len(texts[i]) >= 2 and len(texts[i + 1]) >= 2)
    j = next(j for j in range(2, len(texts)) if texts[j] and not texts[j - 1])
    first_empty = j - 1
    while not texts[first_empty - 1]:
        first_empty -= 1
    cases = {"inside": (texts[i][1:] + texts[i + 1][:2], i + 1), "at-token": (texts[j][:2], first_empty)}
    assert full.index(cases["inside"][0]) == starts[i] + 1 and full.index(cases["at-token"][0]) == starts[j]
    return cases


@pytest.mark.parametrize("case", ["inside", "at-token"])
@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_tokens_line_up_with_the_text(stack, stream, case):
    api, ref = stack
    want = ref.generate(PROMPTS[0], 16, GREEDY).events
    stop, kept = stop_cases(want)[case]
    full = "".join(e.text for e in want)
    text_want, ids_want = full[:full.index(stop)], [e.token_id for e in want[:kept]]
    kw = dict(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop, "never seen"])
    if not stream:
        r = api.completions.create(**kw)
        tokens = r.model_extra["coexit"]["tokens"]
        assert (r.choices[0].text, r.choices[0].finish_reason) == (text_want, "stop")
        assert [t["id"] for t in tokens] == ids_want and r.usage.completion_tokens == kept
        return
    chunks = list(api.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    *body, last, usage = chunks
    assert usage.choices == [] and usage.usage.completion_tokens == kept
    assert last.choices[0].finish_reason == "stop" and last.choices[0].text == ""
    assert "".join(c.choices[0].text for c in body) == text_want
    assert [t["id"] for c in chunks[:-1] for t in c.model_extra["coexit"]["tokens"]] == ids_want
    for n, c in enumerate(body):
        text, tokens = c.choices[0].text, c.model_extra["coexit"]["tokens"]
        assert text, "an empty chunk before the last"
        pieces = "".join(t["text"] for t in tokens)
        cut = case == "inside" and n == len(body) - 1  # the token the stop string cut: all of its text is listed
        assert pieces.startswith(text) if cut else pieces == text, (text, tokens)


@pytest.fixture(scope="module")
def token_cloud(tiny_dir):
    """A real cloud that requires a bearer token."""
    from cloud.server import ServerThread

    with ServerThread(coexit.load(tiny_dir), token="s3cret") as srv:
        yield srv.address


def test_cloud_errors_are_503_saying_what_to_do(tiny_dir, token_cloud, monkeypatch):
    monkeypatch.delenv("COEXIT_TOKEN", raising=False)
    body = {"prompt": "def add(a, b):", "max_tokens": 3, "temperature": 0, "coexit": {"mode": "cloud-only"}}
    with serving(edge_serve("--model", str(tiny_dir), "--cloud", token_cloud, "--encoding", "fp32")) as base:
        for stream in (False, True):
            error(503, [f"the cloud at {token_cloud} refused this server's bearer token", "--token"], None,
                  "unauthenticated", "cloud_error")(http(base, "/completions", {**body, "stream": stream}))
    nothing = f"127.0.0.1:{free_port()}"
    with serving(edge_serve("--model", str(tiny_dir), "--cloud", nothing, "--deadline", "1")) as base:
        error(503, [f"the cloud at {nothing} did not answer", "coexit serve"], None, "unavailable",
              "cloud_error")(http(base, "/completions", body))
    monkeypatch.setenv("COEXIT_TOKEN", "s3cret")  # --token's default
    with serving(edge_serve("--model", str(tiny_dir), "--cloud", token_cloud, "--encoding", "fp32")) as base:
        status, _, r = http(base, "/completions", body)
        assert status == 200 and [t["origin"] for t in r["coexit"]["tokens"]] == ["cloud"] * 3


def test_flags_reach_the_clients(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COEXIT_TOKEN", "from-env")
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    server = edge_serve("--model", str(tiny_dir), "--cloud", "127.0.0.1:1", "--token", "t0k", "--tls-ca", str(ca),
                        "--deadline", "2.5", "--parallel", "1")
    link = server._idle[0].link
    assert (link.metadata, link.root_cert, link.deadline_s) == ([("authorization", "Bearer t0k")], ca.read_bytes(),
                                                                2.5)
    server.close()
    helptext = " ".join(parser().format_help().split())
    for default in ("(default: 5.0)", "(default: 4)", "(default: 16)", "(default: collaborative)",
                    "(default: $COEXIT_TOKEN)", "(default: 8000)"):
        assert default in helptext


@pytest.mark.parametrize("flags,words", [
    (["--cloud", "127.0.0.1:1", "--thresholds", "2:0.8"], ["--thresholds 2:0.8", "LAYER=THRESHOLD"]),
    (["--mode", "standalone", "--thresholds", "2=0.5,4=0.9"], ["layer 4", "edge exits are 2, 3"]),
    (["--mode", "standalone", "--parallel", "0"], ["--parallel", "at least 1", "0"]),
    (["--mode", "standalone", "--max-tokens", "0"], ["--max-tokens", "at least 1", "0"]),
    (["--mode", "standalone", "--quality-budget", "0.1"], ["--quality-budget", "--policy adaptive"]),
    (["--mode", "standalone", "--policy", "adaptive", "--thresholds", "2=0.5"], ["--thresholds", "adaptive"]),
    (["--cloud", "127.0.0.1:1", "--deadline", "0"], ["deadline", "positive"]),
    (["--mode", "cloud-only"], ["--mode cloud-only needs a cloud", "--cloud HOST:PORT"]),
])
def test_bad_flags_are_refused(tiny_dir, flags, words):
    with pytest.raises(UsageError) as info:
        edge_serve("--model", str(tiny_dir), *flags)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_bad_flags_are_one_line(tmp_path):
    """`coexit edge-serve` as a process refuses half a configuration at start: one line on stderr naming the
    problem, exit code 2, no traceback (run concurrently: each process imports torch)."""
    model = ["edge-serve", "--model", str(BUNDLED)]
    cases = [([*model], ["--cloud HOST:PORT", "--mode standalone"]),
             ([*model, "--mode", "standalone", "--thresholds", "3=0.9"], ["layer 3", "edge exits are 2, 4"]),
             ([*model, "--cloud", "127.0.0.1:1", "--tls-ca", "/nonexistent/ca.pem"], ["--tls-ca /nonexistent/ca.pem"])]
    env = {k: v for k, v in os.environ.items() if k not in ("COEXIT_DEBUG", "COEXIT_TOKEN")}
    procs = [subprocess.Popen([sys.executable, "-m", "coexit.cli", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
             for argv, _ in cases]
    for (argv, words), p in zip(cases, procs):
        out, err = p.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in err, (argv, err)
        assert lines[0].startswith("coexit edge-serve: ") and all(w in lines[0] for w in words), (argv, lines)
        assert "OpenAI-compatible API at" not in out  # it never started


@pytest.fixture(scope="module")
def bundled():
    """The bundled model's full model and a real cloud holding it."""
    from cloud.server import ServerThread

    full = coexit.load(BUNDLED)
    with ServerThread(full) as srv:
        yield full, srv.address


def test_lossless_with_the_bundled_policy_is_the_full_model(bundled):
    """Lossless mode through edge-serve, with the model's own learned-gate policy: the server's mode, and a
    request's override of a collaborative server; each equals the full model's greedy text (and cloud-only)."""
    from coexit.decoding import generate_full

    full, address = bundled
    prompt, n = "def read_file(path):\n    with open(path) as f:", 20
    ids = generate_full(full, full.tokenizer.encode(prompt, add_bos=True), n, stop_id=full.tokenizer.eos_id)
    want = full.tokenizer.decode(ids)
    assert len(ids) == n and "return f.read()" in want  # no end of text: every request makes n tokens
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0}
    with serving(edge_serve("--model", str(BUNDLED), "--cloud", address, "--mode", "lossless")) as base:
        for stream in (False, True):
            status, _, r = http(base, "/completions", {**body, "stream": stream})
            assert status == 200, r
            if stream:
                events = [json.loads(line[6:]) for line in r.split("\n\n") if line.startswith("data: {")]
                text = "".join(e["choices"][0]["text"] for e in events)
                assert events[-1]["coexit"]["mode"] == "lossless" and events[-1]["coexit"]["accepted"] > 0
            else:
                text = r["choices"][0]["text"]
                assert r["coexit"]["mode"] == "lossless" and r["coexit"]["accepted"] > 0
                assert [t["id"] for t in r["coexit"]["tokens"]] == ids
            assert text == want
    with serving(edge_serve("--model", str(BUNDLED), "--cloud", address)) as base:
        for mode in ("lossless", "cloud-only"):
            status, _, r = http(base, "/completions", {**body, "coexit": {"mode": mode}})
            assert status == 200 and r["choices"][0]["text"] == want and r["coexit"]["mode"] == mode
