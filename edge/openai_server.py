"""`coexit edge-serve`: an OpenAI-compatible HTTP endpoint on the edge device, backed by EdgeClient (aiohttp).

Routes: GET /v1/models, POST /v1/completions and POST /v1/chat/completions, each streamed (server-sent events,
ending with `data: [DONE]`) or not. Request options: max_tokens, temperature, top_p, stop (a string or up to 4),
seed; n must be 1. The mode and exit policy are server flags; a request may override them in the extension object
`"coexit": {"mode": ..., "threshold": 0.9 | "thresholds": {"2": 0.9}, "policy": "adaptive", "quality_budget": ...}`
(the `openai` client sends it with `extra_body={"coexit": {...}}`). Every response (and every streamed chunk)
carries `"coexit": {"tokens": [{"id", "text", "origin", "exit_layer", "logprob"}, ...]}` with each token's origin
(edge, cloud, edge-standalone) and the layer whose head made it; the final response or chunk adds the counters.

Concurrency: a pool of `--parallel` EdgeClients (each its own edge KV and its own cloud session); a request
borrows one for its whole generation, which runs on a worker thread, so several apps are served at once.

Chat: the bundled model is a code model without a chat template, so a chat request's messages are joined
(contents, one per line) into one completion prompt; the reply is the continuation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import threading
import time
from pathlib import Path

from aiohttp import web

from coexit.exits import ExitPolicy
from coexit.sampling import SamplingParams
from edge.client import MODES, EdgeClient, TokenEvent
from edge.link import CloudError

_DONE = object()


class RequestError(ValueError):
    """A client mistake: answered 400 with OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": None}},
                             status=status)


def chat_prompt(messages) -> str:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    parts = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise RequestError("each message needs a string content", "messages")
        parts.append(m["content"])
    return "\n".join(parts) + ("" if parts[-1].endswith("\n") else "\n")


class Settings:
    """One request's generation settings, read and checked from its JSON body."""

    def __init__(self, body: dict, defaults: dict) -> None:
        if body.get("n", 1) != 1:
            raise RequestError("only n=1 is supported", "n")
        self.max_tokens = body.get("max_tokens", body.get("max_completion_tokens", defaults["max_tokens"]))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError("max_tokens must be a positive integer", "max_tokens")
        temperature = body.get("temperature", 1.0)
        top_p = body.get("top_p", 1.0)
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbits(32)
        try:
            self.sampling = SamplingParams(float(temperature), 0, float(top_p), int(seed))
        except (TypeError, ValueError) as exc:
            raise RequestError(f"bad sampling parameters: {exc}") from None
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise RequestError("stop must be a string or a list of up to 4 non-empty strings", "stop")
        self.stop = stop
        self.stream = bool(body.get("stream", False))
        ext = body.get("coexit") or {}
        if not isinstance(ext, dict):
            raise RequestError("the coexit extension must be an object", "coexit")
        self.mode = ext.get("mode", defaults["mode"])
        if self.mode not in MODES or self.mode == "naive-split":
            raise RequestError(f"coexit.mode must be one of {[m for m in MODES if m != 'naive-split']}", "coexit")
        self.policy = defaults["policy_for"](ext)


class StopScanner:
    """Cuts generated text at the first stop string; while streaming, holds back a tail that could still grow
    into one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.text, self.sent, self.stopped = stops, "", 0, False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, piece: str) -> str:
        """Add a piece; return the text that is now safe to send."""
        self.text += piece
        for s in self.stops:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        safe = len(self.text) if self.stopped else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:safe], safe
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


class EdgeServer:
    def __init__(self, model_dir: str | Path, cloud: str | None, mode: str = "collaborative",
                 policy: ExitPolicy | None = None, parallel: int = 4, backend: str = "torch",
                 model_name: str | None = None, max_tokens: int = 16, client_kw: dict | None = None) -> None:
        self.model_dir, self.cloud, self.mode, self.backend = Path(model_dir), cloud, mode, backend
        self.model_name = model_name or self.model_dir.name
        self.client_kw = client_kw or {}
        self.defaults = {"max_tokens": max_tokens, "mode": mode, "policy_for": self._policy_for}
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._idle: list[EdgeClient] = []
        self._slots = asyncio.Semaphore(parallel) if parallel > 0 else None
        self.policy = policy  # None: each client's calibrated default
        self._adaptive: dict[float | None, ExitPolicy] = {}  # by quality budget: their estimates are the link's
        self._idle.append(self._make_client())  # load once up front: a bad model fails at start, not per request
        self.edge_exits = self._idle[0].backend.exit_layers

    def _make_client(self) -> EdgeClient:
        return EdgeClient.from_checkpoint(self.model_dir, cloud=self.cloud, backend=self.backend, mode=self.mode,
                                          **self.client_kw)

    def _policy_for(self, ext: dict) -> ExitPolicy | None:
        """The request's policy override from its coexit extension, else the server's."""
        if ext.get("policy") == "adaptive":
            return self.adaptive(ext.get("quality_budget"))
        if ext.get("policy") not in (None, "calibrated"):
            raise RequestError("coexit.policy must be 'adaptive' or 'calibrated'", "coexit")
        try:
            if "thresholds" in ext:
                return ExitPolicy({int(k): float(v) for k, v in dict(ext["thresholds"]).items()})
            if "threshold" in ext:
                return ExitPolicy.uniform(self.edge_exits, float(ext["threshold"]))
        except (TypeError, ValueError) as exc:
            raise RequestError(f"bad coexit thresholds: {exc}", "coexit") from None
        return self.policy

    def adaptive(self, budget) -> ExitPolicy:
        from edge.calibrate import load_policy

        if budget is not None and not (isinstance(budget, (int, float)) and 0 <= budget <= 1):
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
        app.router.add_get("/health", lambda _: web.json_response({"status": "ok"}))
        app.on_cleanup.append(lambda _: asyncio.to_thread(self.close))
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "coexit"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object")
            if chat:
                prompt = chat_prompt(body.get("messages"))
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                    prompt = prompt[0]
                if not (isinstance(prompt, str) and prompt) and not (
                        isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
                    raise RequestError("prompt must be a non-empty string, or a list of token ids", "prompt")
            settings = Settings(body, self.defaults)
        except json.JSONDecodeError:
            return _error(400, "the request body is not valid JSON")
        except RequestError as exc:
            return _error(400, str(exc), param=exc.param)
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

    def _generate(self, prompt, s: Settings, push) -> dict:
        """Worker thread: run one generation on a borrowed client, calling push(events, text) per token batch.
        Returns the finish reason and counters."""
        client = self._borrow()
        try:
            run = client.stream(prompt, s.max_tokens, s.sampling, policy=s.policy, mode=s.mode)
            events = iter(run)
            scan, finish, ids, raw = StopScanner(s.stop), "length", [], ""
            for ev in events:
                if ev.kind != "token":
                    continue
                ids.append(ev.token_id)
                raw += ev.text
                push([ev], scan.push(ev.text))
                if scan.stopped:
                    finish = "stop"
                    break
                if client.tokenizer is not None and ev.token_id == client.tokenizer.eos_id:
                    finish = "stop"
            events.close()  # ends the cloud session now, also after a stop string
            full = client.tokenizer.decode(ids) if client.tokenizer is not None else raw
            if not scan.stopped and full.startswith(raw):  # bytes of a character the last token left unfinished
                push([], scan.push(full[len(raw):]))
            tail = scan.flush()
            if tail:
                push([], tail)
            c = run.counters
            return {"finish_reason": finish, "completion_tokens": len(ids),
                    "prompt_tokens": len(getattr(run, "prompt_ids", [])),
                    "counters": {"bytes_up": c.bytes_up, "bytes_down": c.bytes_down, "fallbacks": c.fallbacks,
                                 "standalone": c.standalone, "cloud_layer_tokens": c.cloud_layer_tokens,
                                 "drafts": c.drafts, "accepted": c.accepted, "rejected": c.rejected}}
        finally:
            self._give_back(client)

    async def _whole(self, rid: str, chat: bool, prompt, s: Settings) -> web.Response:
        events: list[TokenEvent] = []
        pieces: list[str] = []

        def push(evs, text):
            events.extend(evs)
            pieces.append(text)

        try:
            done = await asyncio.to_thread(self._generate, prompt, s, push)
        except CloudError as exc:
            return _error(503, f"the cloud failed: {exc}", "cloud_error")
        text = "".join(pieces)
        choice = {"index": 0, "finish_reason": done["finish_reason"], "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        usage = {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                 "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}
        return web.json_response({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": self.model_name, "choices": [choice], "usage": usage,
            "coexit": {"mode": s.mode, "tokens": [_token(e) for e in events], **done["counters"]}})

    async def _stream(self, request: web.Request, rid: str, chat: bool, prompt, s: Settings) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        created = int(time.time())

        def chunk(text: str | None, evs, finish=None, extra=None) -> bytes:
            if chat:
                delta = {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                    "model": self.model_name, "choices": [choice],
                    "coexit": {"tokens": [_token(e) for e in evs], **(extra or {})}}
            return f"data: {json.dumps(body)}\n\n".encode()

        def push(evs, text):
            loop.call_soon_threadsafe(queue.put_nowait, (evs, text))

        def work():
            try:
                result = self._generate(prompt, s, push)
            except Exception as exc:  # reported in the stream: the headers are already sent
                result = exc
            loop.call_soon_threadsafe(queue.put_nowait, (_DONE, result))

        if chat:
            first = json.loads(chunk(None, [])[6:])
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            await resp.write(f"data: {json.dumps(first)}\n\n".encode())
        worker = loop.run_in_executor(None, work)
        while True:
            evs, text = await queue.get()
            if evs is _DONE:
                break
            await resp.write(chunk(text, evs))
        await worker
        if isinstance(text, Exception):
            err = {"error": {"message": f"generation failed: {text}", "type": "cloud_error"}}
            await resp.write(f"data: {json.dumps(err)}\n\n".encode())
        else:
            await resp.write(chunk(None if chat else "", [], text["finish_reason"],
                                   {"mode": s.mode, **text["counters"]}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _token(e: TokenEvent) -> dict:
    return {"id": e.token_id, "text": e.text, "position": e.position, "origin": e.origin,
            "exit_layer": e.exit_layer, "logprob": e.logprob}


def main(argv: list[str]) -> int:
    from edge.cli import parse_thresholds

    ap = argparse.ArgumentParser(prog="coexit edge-serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--cloud", help="HOST:PORT of `coexit serve` (not needed with --mode standalone)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--mode", choices=[m for m in MODES if m != "naive-split"], default="collaborative")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--thresholds", help="per-exit thresholds, e.g. 2=0.8,4=0.9 (default: the calibrated policy)")
    ap.add_argument("--policy", choices=["calibrated", "adaptive"], default="calibrated",
                    help="adaptive: the network-aware policy within --quality-budget")
    ap.add_argument("--quality-budget", type=float, help="adaptive policy: the disagreement with the full model "
                                                         "allowed over all tokens (default: the calibrated policy's)")
    ap.add_argument("--parallel", type=int, default=4, help="generations served at once (each its own session)")
    ap.add_argument("--encoding", default="fp16")
    ap.add_argument("--max-tokens", type=int, default=16, help="default max_tokens of a request")
    ap.add_argument("--model-name", help="the id /v1/models reports (default: the model directory's name)")
    args = ap.parse_args(argv)
    policy = ExitPolicy(parse_thresholds(args.thresholds)) if args.thresholds else None
    server = EdgeServer(args.model, args.cloud, args.mode, policy, args.parallel, args.backend, args.model_name,
                        args.max_tokens, {"encoding": args.encoding})
    if args.policy == "adaptive":
        server.policy = server.adaptive(args.quality_budget)
    print(f"coexit edge-serve: OpenAI-compatible API at http://{args.host}:{args.port}/v1 (model "
          f"{server.model_name}, mode {args.mode}, cloud {args.cloud})", flush=True)
    web.run_app(server.app(), host=args.host, port=args.port, print=None)
    return 0
