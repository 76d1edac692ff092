"""`coexit edge-serve`: an OpenAI-compatible HTTP endpoint on the edge device, backed by EdgeClient (aiohttp).

Routes: GET /v1/models (with each model's context, `max_model_len`), POST /v1/completions and
POST /v1/chat/completions, each streamed (server-sent events, ending with `data: [DONE]`) or not.

Request options: model (absent, or the served id: another answers 404 model_not_found), prompt (a string, or a
list of token ids) or messages, max_tokens (or max_completion_tokens), temperature in [0, 2], top_p in (0, 1],
top_k (vLLM's extension), seed, stop (a string or up to 4), stream and stream_options.include_usage. OpenAI
options this server does not implement are refused with 400 naming them instead of being ignored: logprobs and
top_logprobs (each token's logprob is in `coexit.tokens`), echo, n and best_of above 1, suffix, tools, functions,
response_format other than text, logit_bias, and presence or frequency penalties; their neutral values (n 1,
logprobs false, penalties 0, ...) pass. A prompt that with max_tokens exceeds the model's context answers 400
context_length_exceeded, before any token (and, streamed, before the headers).

The mode and exit policy are server flags; a request may override them in the extension object
`"coexit": {"mode": ..., "threshold": 0.9 | "thresholds": {"2": 0.9}, "policy": "adaptive" | "calibrated",
"quality_budget": ...}` (the `openai` client sends it with `extra_body={"coexit": {...}}`). Thresholds must name
edge exits; an unknown key or a contradicting pair is refused. Every response (and every streamed chunk) carries
`"coexit": {"tokens": [{"id", "text", "position", "origin", "exit_layer", "logprob"}, ...]}` with each token's
origin (edge, cloud, edge-standalone) and the layer whose head made it; the final response or chunk adds the
counters.

Stop strings: a chunk lists exactly the tokens whose text it carries, so the tokens' texts joined are the chunk's
text; text that could still grow into a stop string is held back with its tokens. Tokens after the stop string's
start are dropped; the token the stop string cuts in two is kept (part of its text is returned), listed and
counted in `usage.completion_tokens`, which counts the tokens returned. A token whose text is empty (inside a
multi-byte character) goes with the token that completes the character; the end-of-text token goes with the final
chunk.

Errors: OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad request, 404 for an
unknown model, 503 when the cloud fails a generation (with what to do, e.g. start edge-serve with --token);
after a streamed response has started, an error is sent as a last `data: {"error": ...}` event.

Concurrency: a pool of `--parallel` EdgeClients (each its own edge KV and its own cloud session); a request
borrows one for its whole generation, which runs on a worker thread, so several apps are served at once.

Chat: the bundled model is a code model without a chat template, so a chat request's messages are joined
(contents, one per line) into one completion prompt; the reply is the continuation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import threading
import time
from pathlib import Path

import grpc
from aiohttp import web

from coexit.errors import ContextLengthError, UsageError
from coexit.exits import ExitPolicy, check_thresholds
from coexit.sampling import SamplingParams
from edge.client import MODES, EdgeClient, TokenEvent
from edge.link import CloudError, CloudUnavailable

_DONE = object()
SERVE_MODES = [m for m in MODES if m != "naive-split"]
EXTENSION_KEYS = ("mode", "threshold", "thresholds", "policy", "quality_budget")
SUPPORTED = ("model, prompt or messages, max_tokens, temperature, top_p, top_k, seed, stop, stream, "
             "stream_options and the coexit extension")
# OpenAI options this server does not implement: their neutral values, and what to do instead.
_UNSUPPORTED = {
    "logprobs": ((None, False, 0), "each token's logprob is in the response's coexit.tokens"),
    "top_logprobs": ((None, 0), "each token's logprob is in the response's coexit.tokens"),
    "echo": ((None, False), "prepend the prompt yourself"),
    "n": ((None, 1), "one choice per request: send several requests (with different seeds)"),
    "best_of": ((None, 1), "one choice per request: send several requests (with different seeds)"),
    "suffix": ((None, ""), "insertion is not supported"),
    "tools": ((None, []), "tool calling is not supported"),
    "functions": ((None, []), "tool calling is not supported"),
    "tool_choice": ((None, "none"), "tool calling is not supported"),
    "function_call": ((None, "none"), "tool calling is not supported"),
    "response_format": ((None, {"type": "text"}), "only plain text output is supported"),
    "logit_bias": ((None, {}), "sampling takes temperature, top_p, top_k and seed"),
    "presence_penalty": ((None, 0), "sampling takes temperature, top_p, top_k and seed"),
    "frequency_penalty": ((None, 0), "sampling takes temperature, top_p, top_k and seed"),
}


class RequestError(UsageError):
    """A client mistake: answered `status` (400 unless said) with OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}},
                             status=status)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def chat_prompt(messages) -> str:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    parts = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                             isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError("each message needs a string content (or a list of text parts): only text is "
                               "supported", "messages")
        parts.append(content)
    return "\n".join(parts) + ("" if parts[-1].endswith("\n") else "\n")


class Settings:
    """One request's generation settings, read and checked from its JSON body."""

    def __init__(self, body: dict, defaults: dict) -> None:
        for key, (neutral, hint) in _UNSUPPORTED.items():
            if body.get(key) not in neutral:
                raise RequestError(f"{key} is not supported by coexit edge-serve ({hint}); supported options: "
                                   f"{SUPPORTED}", key)
        self.max_tokens = next((body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None),
                               defaults["max_tokens"])
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise RequestError("max_tokens must be a positive integer", "max_tokens")
        temperature, top_p, top_k = body.get("temperature", 1.0), body.get("top_p", 1.0), body.get("top_k", 0)
        if not (_is_number(temperature) and 0 <= temperature <= 2):
            raise RequestError(f"temperature must be a number in [0, 2], got {temperature!r}", "temperature")
        if not (_is_number(top_p) and 0 < top_p <= 1):
            raise RequestError(f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
        if top_k == -1:  # vLLM's "no limit"
            top_k = 0
        if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0):
            raise RequestError(f"top_k must be an integer >= 0 (0 or -1: no limit), got {top_k!r}", "top_k")
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbits(32)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise RequestError(f"seed must be an integer, got {seed!r}", "seed")
        self.sampling = SamplingParams(float(temperature), top_k, float(top_p), seed)
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise RequestError("stop must be a string or a list of up to 4 non-empty strings", "stop")
        self.stop = stop
        self.stream = bool(body.get("stream", False))
        options = body.get("stream_options")
        if options is not None and not (self.stream and isinstance(options, dict) and set(options) <=
                                        {"include_usage"}):
            raise RequestError("stream_options goes with stream: true and takes include_usage only",
                               "stream_options")
        self.include_usage = bool((options or {}).get("include_usage"))
        ext = body.get("coexit") or {}
        if not isinstance(ext, dict):
            raise RequestError("the coexit extension must be an object", "coexit")
        unknown = sorted(set(ext) - set(EXTENSION_KEYS))
        if unknown:
            raise RequestError(f"unknown coexit option {unknown[0]!r}: the coexit extension takes "
                               f"{', '.join(EXTENSION_KEYS)}", "coexit")
        self.mode = ext.get("mode", defaults["mode"])
        if self.mode not in SERVE_MODES:
            raise RequestError(f"coexit.mode must be one of {', '.join(SERVE_MODES)}", "coexit")
        self.policy = defaults["policy_for"](ext)


class TokenText:
    """Token events in, (text, tokens) chunks out: cut at the first stop string, and aligned, so a chunk's
    tokens' texts joined are its text (bar the token a stop string cuts in two, which is kept).

    While streaming, the text that could still grow into a stop string is held back with its tokens. A token whose
    text is empty (inside a multi-byte character, or a special token) waits for the next token with text, and
    goes with it; one left at the end goes with the final chunk. `kept` counts the tokens handed out."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.text, self.sent, self.stopped, self.kept = stops, "", 0, False, 0
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.units: list[tuple[list[TokenEvent], int, int]] = []  # (events, start, end) of text not yet sent
        self.waiting: list[TokenEvent] = []  # tokens without text yet

    def push(self, event: TokenEvent | None, text: str) -> tuple[str, list[TokenEvent]]:
        """Add a token and its text (or text alone: the end of a character the last token left unfinished);
        return the text now safe to send and its tokens."""
        if self.stopped:
            return "", []
        if event is not None:
            self.waiting.append(event)
        if not text:
            return "", []
        start = len(self.text)
        self.text += text
        self.units.append((self.waiting, start, len(self.text)))
        self.waiting = []
        found = [i for i in (self.text.find(s, max(0, start - len(s) + 1)) for s in self.stops) if i >= 0]
        if found:
            at = min(found)
            self.text, self.stopped = self.text[:at], True
            self.units = [u for u in self.units if u[1] < at]  # the cut token stays: part of its text is returned
            return self._send(len(self.units), at)
        safe = [i for i, u in enumerate(self.units) if u[2] <= len(self.text) - self.hold]
        return self._send(safe[-1] + 1, self.units[safe[-1]][2]) if safe else ("", [])

    def flush(self) -> tuple[str, list[TokenEvent]]:
        """What is left at the end of the generation."""
        if not self.stopped and self.waiting:
            self.units.append((self.waiting, len(self.text), len(self.text)))
            self.waiting = []
        return self._send(len(self.units), len(self.text))

    def _send(self, n: int, upto: int) -> tuple[str, list[TokenEvent]]:
        events = [e for u in self.units[:n] for e in u[0]]
        del self.units[:n]
        out, self.sent = self.text[self.sent:upto], upto
        self.kept += len(events)
        return out, events


def cloud_sentence(exc: CloudError, cloud: str | None) -> str:
    """A cloud failure as a sentence that says what to do."""
    where = f"the cloud at {exc.address or cloud}"
    if exc.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return (f"{where} refused this server's bearer token ({exc.details}): start edge-serve with --token (or "
                f"COEXIT_TOKEN) set to the token the cloud was started with")
    if isinstance(exc, CloudUnavailable):
        return (f"{where} did not answer ({exc.details}): check that `coexit serve` runs there and edge-serve's "
                f"--cloud (with TLS, --tls-ca)")
    return f"{where} answered {exc.code.name}: {exc.details}"


class EdgeServer:
    def __init__(self, model_dir: str | Path, cloud: str | None, mode: str = "collaborative",
                 policy: ExitPolicy | None = None, parallel: int = 4, backend: str = "torch",
                 model_name: str | None = None, max_tokens: int = 16, client_kw: dict | None = None) -> None:
        from edge.policy.calibrate import POLICY_FILE

        self.model_dir, self.cloud, self.mode, self.backend = Path(model_dir), cloud, mode, backend
        self.model_name = model_name or self.model_dir.name
        self.client_kw = client_kw or {}
        self.defaults = {"max_tokens": max_tokens, "mode": mode, "policy_for": self._policy_for}
        self.created = int(time.time())
        self.calibrated = (self.model_dir / POLICY_FILE).is_file()
        self._lock = threading.Lock()
        self._idle: list[EdgeClient] = []
        self._slots = asyncio.Semaphore(parallel) if parallel > 0 else None
        self._adaptive: dict[float | None, ExitPolicy] = {}  # by quality budget: their estimates are the link's
        self._idle.append(self._make_client())  # load once up front: a bad model fails at start, not per request
        be = self._idle[0].backend
        self.edge_exits, self.max_length, self.vocab_size = be.exit_layers, be.max_length, be.config.vocab_size
        if type(policy) is ExitPolicy:  # fixed thresholds (--thresholds): each must be an edge exit
            try:
                check_thresholds(policy.thresholds, self.edge_exits, policy.criterion)
            except UsageError:
                self.close()
                raise
        self.policy = policy  # None: each client's calibrated default

    def _make_client(self) -> EdgeClient:
        return EdgeClient.from_checkpoint(self.model_dir, cloud=self.cloud, backend=self.backend, mode=self.mode,
                                          **self.client_kw)

    def _policy_for(self, ext: dict) -> ExitPolicy | None:
        """The request's policy override from its coexit extension, else the server's."""
        kind = ext.get("policy")
        if kind not in (None, "calibrated", "adaptive"):
            raise RequestError("coexit.policy must be 'adaptive' or 'calibrated'", "coexit")
        fixed = [k for k in ("threshold", "thresholds") if k in ext]
        if len(fixed) > 1:
            raise RequestError("give coexit.threshold or coexit.thresholds, not both", "coexit")
        if fixed and kind:
            raise RequestError(f"coexit.{fixed[0]} sets a fixed policy: drop coexit.policy", "coexit")
        if "quality_budget" in ext and kind != "adaptive":
            raise RequestError("coexit.quality_budget applies to \"policy\": \"adaptive\" only", "coexit")
        if kind == "adaptive":
            return self.adaptive(ext.get("quality_budget"))
        if kind == "calibrated":
            if not self.calibrated:
                raise RequestError(f"{self.model_name} has no calibrated policy (exit_policy.json): run `coexit "
                                   f"calibrate`, or give coexit.thresholds", "coexit")
            return None  # each client's own calibrated policy (a learned gate keeps per-run state)
        if not fixed:
            return self.policy
        try:
            if "thresholds" in ext:
                thresholds = {int(k): float(v) for k, v in dict(ext["thresholds"]).items()}
            else:
                thresholds = {e: float(ext["threshold"]) for e in self.edge_exits}
            check_thresholds(thresholds, self.edge_exits)
        except (TypeError, ValueError) as exc:  # UsageError is a ValueError
            raise RequestError(f"bad coexit.{fixed[0]}: {exc}", "coexit") from None
        return ExitPolicy(thresholds)

    def adaptive(self, budget) -> ExitPolicy:
        from edge.policy.calibrate import load_policy

        if budget is not None and not (_is_number(budget) and 0 <= budget <= 1):
            raise RequestError("coexit.quality_budget must be a number in [0, 1]", "coexit")
        with self._lock:
            if budget not in self._adaptive:
                try:
                    self._adaptive[budget] = load_policy(self.model_dir, adaptive=True, quality_budget=budget)
                except (FileNotFoundError, ValueError) as exc:
                    raise RequestError(f"no adaptive policy: {exc}", "coexit") from None
            return self._adaptive[budget]

    def _borrow(self) -> EdgeClient:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._make_client()

    def _give_back(self, client: EdgeClient) -> None:
        with self._lock:
            self._idle.append(client)

    def close(self) -> None:
        with self._lock:
            for c in self._idle:
                c.close()
            self._idle.clear()

    # ---- the app -------------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/health", self.health)
        app.on_cleanup.append(lambda _: asyncio.to_thread(self.close))
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "coexit",
             "max_model_len": self.max_length, "context_length": self.max_length}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    def _prompt(self, body: dict, chat: bool):
        if chat:
            return chat_prompt(body.get("messages"))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            return prompt
        if isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in prompt):
            return prompt
        raise RequestError("prompt must be a non-empty string, or a list of token ids within the vocabulary "
                           "(one prompt per request)", "prompt")

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object")
            model = body.get("model")
            if model is not None and model != self.model_name:
                raise RequestError(f"The model {model!r} does not exist or you do not have access to it; this "
                                   f"server serves {self.model_name!r}", "model", "model_not_found", 404)
            prompt = self._prompt(body, chat)
            settings = Settings(body, self.defaults)
        except json.JSONDecodeError:
            return _error(400, "the request body is not valid JSON")
        except RequestError as exc:
            return _error(exc.status, str(exc), param=exc.param, code=exc.code)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        if self._slots is not None:
            await self._slots.acquire()
        try:
            if settings.stream:
                return await self._stream(request, rid, chat, prompt, settings)
            return await self._whole(rid, chat, prompt, settings)
        finally:
            if self._slots is not None:
                self._slots.release()

    def _failure(self, exc: BaseException, chat: bool) -> web.Response:
        """A generation that failed before sending anything, as an error response (an unexpected one: raised)."""
        if isinstance(exc, ContextLengthError):
            param = ("messages" if chat else "prompt") if exc.prompt_tokens >= exc.limit else "max_tokens"
            return _error(400, str(exc), param=param, code="context_length_exceeded")
        if isinstance(exc, UsageError):
            return _error(400, str(exc), param=getattr(exc, "param", None))
        if isinstance(exc, CloudError):
            return _error(503, cloud_sentence(exc, self.cloud), "cloud_error", code=exc.code.name.lower())
        raise exc

    def _generate(self, prompt, s: Settings, push) -> dict:
        """Worker thread: run one generation on a borrowed client, calling push(text, events) per piece of text
        that is safe to send. Returns the finish reason, the text left to send with its tokens, and the counters.
        Raises ContextLengthError (or another UsageError) before the first token when the run cannot start."""
        client = self._borrow()
        try:
            run = client.stream(prompt, s.max_tokens, s.sampling, policy=s.policy, mode=s.mode)
            events = iter(run)
            out, finish, ids, raw = TokenText(s.stop), "length", [], ""
            eos = client.tokenizer.eos_id if client.tokenizer is not None else None
            try:
                for ev in events:
                    if ev.kind != "token":
                        continue
                    ids.append(ev.token_id)
                    raw += ev.text
                    text, evs = out.push(ev, ev.text)
                    if text or evs:
                        push(text, evs)
                    if out.stopped or ev.token_id == eos:
                        finish = "stop"
                    if out.stopped:
                        break
            finally:
                events.close()  # ends the cloud session now, also after a stop string
            full = client.tokenizer.decode(ids) if client.tokenizer is not None else raw
            if full.startswith(raw) and len(full) > len(raw):  # the bytes of a character left unfinished
                text, evs = out.push(None, full[len(raw):])
                if text or evs:
                    push(text, evs)
            rest, c = out.flush(), run.counters
            return {"finish_reason": finish, "rest": rest, "completion_tokens": out.kept,
                    "prompt_tokens": len(run.prompt_ids),
                    "counters": {"bytes_up": c.bytes_up, "bytes_down": c.bytes_down, "fallbacks": c.fallbacks,
                                 "standalone": c.standalone, "cloud_layer_tokens": c.cloud_layer_tokens,
                                 "drafts": c.drafts, "accepted": c.accepted, "rejected": c.rejected}}
        finally:
            self._give_back(client)

    @staticmethod
    def _usage(done: dict) -> dict:
        return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}

    async def _whole(self, rid: str, chat: bool, prompt, s: Settings) -> web.Response:
        events: list[TokenEvent] = []
        pieces: list[str] = []

        def push(text, evs):
            pieces.append(text)
            events.extend(evs)

        try:
            done = await asyncio.to_thread(self._generate, prompt, s, push)
        except Exception as exc:
            return self._failure(exc, chat)
        push(*done["rest"])
        text = "".join(pieces)
        choice = {"index": 0, "finish_reason": done["finish_reason"], "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return web.json_response({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": self.model_name, "choices": [choice], "usage": self._usage(done),
            "coexit": {"mode": s.mode, "tokens": [_token(e) for e in events], **done["counters"]}})

    async def _stream(self, request: web.Request, rid: str, chat: bool, prompt, s: Settings) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        created = int(time.time())

        def put(*item) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work():
            try:
                result = self._generate(prompt, s, put)
            except Exception as exc:  # before the first chunk: answered with a status; after: in the stream
                result = exc
            put(_DONE, result)

        def chunk(text: str | None, evs, finish=None, extra=None) -> bytes:
            if chat:
                delta = {"content": text} if text else {}
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return _event({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                           "created": created, "model": self.model_name, "choices": [choice],
                           "coexit": {"tokens": [_token(e) for e in evs], **(extra or {})}})

        worker = loop.run_in_executor(None, work)
        text, result = await queue.get()  # the headers wait for it: a failure before any text gets a status
        if text is _DONE and isinstance(result, Exception):
            await worker
            return self._failure(result, chat)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        if chat:
            first = json.loads(chunk(None, [])[6:])
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            await resp.write(_event(first))
        while text is not _DONE:
            await resp.write(chunk(text, result))
            text, result = await queue.get()
        await worker
        if isinstance(result, Exception):
            message = cloud_sentence(result, self.cloud) if isinstance(result, CloudError) else str(result)
            await resp.write(_event({"error": {"message": f"generation failed: {message}", "type": "cloud_error",
                                               "param": None, "code": None}}))
        else:
            text, evs = result["rest"]
            await resp.write(chunk(text, evs, result["finish_reason"], {"mode": s.mode, **result["counters"]}))
            if s.include_usage:
                await resp.write(_event({"id": rid, "object": "chat.completion.chunk" if chat else
                                         "text_completion", "created": created, "model": self.model_name,
                                         "choices": [], "usage": self._usage(result)}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _event(body: dict) -> bytes:
    return f"data: {json.dumps(body)}\n\n".encode()


def _token(e: TokenEvent) -> dict:
    return {"id": e.token_id, "text": e.text, "position": e.position, "origin": e.origin,
            "exit_layer": e.exit_layer, "logprob": e.logprob}


def parser() -> argparse.ArgumentParser:
    from coexit.cli import HelpFormatter
    from edge.backends import KINDS

    ap = argparse.ArgumentParser(prog="coexit edge-serve", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="the model directory")
    ap.add_argument("--cloud", help="HOST:PORT of `coexit serve`; required unless --mode standalone")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=int, default=8000, help="HTTP port")
    ap.add_argument("--mode", choices=SERVE_MODES, default="collaborative", help="a request may override it")
    ap.add_argument("--backend", choices=KINDS, default="torch", help="edge runtime")
    ap.add_argument("--adapter", help="a LoRA adapter directory applied to the edge layers (`coexit adapt`)")
    ap.add_argument("--thresholds", help="per-exit thresholds, e.g. 2=0.8,4=0.9, at edge exits only (default: the "
                                         "model's calibrated policy)")
    ap.add_argument("--policy", choices=["calibrated", "adaptive"], default="calibrated",
                    help="adaptive: the network-aware policy within --quality-budget")
    ap.add_argument("--quality-budget", type=float, help="adaptive policy: the disagreement with the full model "
                                                         "allowed over all tokens (default: the calibrated policy's)")
    ap.add_argument("--parallel", type=int, default=4, help="generations served at once (each its own session)")
    ap.add_argument("--encoding", choices=["fp32", "fp16", "bf16", "int8"], default="fp16",
                    help="how hidden states travel to the cloud")
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens of a request that gives none")
    ap.add_argument("--model-name", help="the id /v1/models reports (default: the model directory's name)")
    ap.add_argument("--token", help="bearer token the cloud requires (default: $COEXIT_TOKEN)")
    ap.add_argument("--tls-ca", help="PEM CA certificate: connect to the cloud with TLS, trusting servers it signed "
                                     "(default: plaintext)")
    ap.add_argument("--deadline", type=float, default=5.0, help="seconds to wait for the cloud per step")
    return ap


def server_from_args(args: argparse.Namespace) -> EdgeServer:
    """Check the flags (raising UsageError naming the bad one) and load the server."""
    from edge.apps.generate import parse_thresholds

    if args.cloud is None and args.mode != "standalone":
        raise UsageError(f"--mode {args.mode} needs a cloud: pass --cloud HOST:PORT of a `coexit serve`, or use "
                         f"--mode standalone")
    if args.parallel < 1:
        raise UsageError(f"--parallel must be at least 1, got {args.parallel}")
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.tls_ca is not None and not Path(args.tls_ca).is_file():
        raise UsageError(f"--tls-ca {args.tls_ca}: no such file")
    if args.policy == "adaptive" and args.thresholds:
        raise UsageError("--thresholds sets a fixed policy: drop it, or drop --policy adaptive")
    if args.quality_budget is not None and args.policy != "adaptive":
        raise UsageError("--quality-budget applies to --policy adaptive only")
    if args.quality_budget is not None and not 0 <= args.quality_budget <= 1:
        raise UsageError(f"--quality-budget must be within [0, 1], got {args.quality_budget}")
    try:
        policy = ExitPolicy(parse_thresholds(args.thresholds)) if args.thresholds else None
    except ValueError as exc:
        raise UsageError(f"--thresholds {args.thresholds}: {exc} (expected LAYER=THRESHOLD,..., e.g. "
                         f"2=0.8,4=0.9)") from None
    token = args.token if args.token is not None else os.environ.get("COEXIT_TOKEN") or None
    server = EdgeServer(args.model, args.cloud, args.mode, policy, args.parallel, args.backend, args.model_name,
                        args.max_tokens, {"encoding": args.encoding, "token": token, "tls_ca": args.tls_ca,
                                          **({"adapter": args.adapter} if args.adapter else {}),
                                          "deadline_s": args.deadline})
    if args.policy == "adaptive":
        server.policy = server.adaptive(args.quality_budget)
    return server


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    server = server_from_args(args)
    banner = (f"coexit edge-serve: OpenAI-compatible API at http://{args.host}:{args.port}/v1 (model "
              f"{server.model_name}, mode {args.mode}, cloud {args.cloud or 'none'})")
    web.run_app(server.app(), host=args.host, port=args.port, print=lambda _: print(banner, flush=True))  # once bound
    return 0
