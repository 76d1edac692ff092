"""The edge SDK: EdgeClient runs the shallow stage, takes confident exits locally and falls back to the cloud.

Modes:
  collaborative  (default) edge exits when confident, else the cloud finishes the token; the edge uploads exactly
                 the split-layer rows the cloud lacks, each position once per cloud session.
  standalone     edge exits only (the deepest edge exit when none is confident); never the network.
  cloud-only     baseline: token ids go up and the cloud runs the whole model.
  naive-split    baseline: no exits; every token crosses and the whole context is resent each step.
  lossless       the edge's exits draft tokens that the cloud verifies (edge/lossless.py): output identical to the
                 full model's (greedy) or distributed as the full model's (sampling).

kv_fill="propagate" (collaborative mode) opens the cloud session with approximate KV: rows of positions that
exited on the edge are flagged (fill_rows) and the cloud propagates their deep-layer KV instead of computing it.

When the cloud is unreachable or misses its deadline, a collaborative run continues standalone (tokens marked
origin "edge-standalone") and retries the cloud every `retry_s`; on its return it resumes the session, or opens a
new one and replays the split rows it kept. Tokens already emitted never change.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc

from coexit.errors import UsageError
from coexit.exits import ExitPolicy
from coexit.sampling import GREEDY, SamplingParams
from coexit.tokenizer import Tokenizer
from coexit.v1 import coexit_pb2 as pb
from coexit.v1.convert import ENCODING_CODES
from edge.backends.base import EdgeBackend
from edge.link import CloudError, CloudLink
from edge.lossless import LosslessRun
from edge.run import KV_FILLS, MODES, Counters, Generation, Run, TokenEvent

__all__ = ["EdgeClient", "Generation", "TokenEvent", "Counters", "MODES", "KV_FILLS"]


class EdgeClient:
    def __init__(self, backend: EdgeBackend, tokenizer: Tokenizer | None = None, cloud: str | None = None,
                 encoding: str = "fp32", policy: ExitPolicy | None = None, mode: str = "collaborative",
                 deadline_s: float = 5.0, retry_s: float = 0.5, prefill_chunk: int = 256,
                 token: str | None = None, cloud_exits: dict[int, float] | None = None,
                 tls_ca: str | None = None, kv_fill: str = "exact", max_drafts: int = 8,
                 draft_always: bool = True, heartbeat_s: float | None = 15.0) -> None:
        """kv_fill: "exact" or "propagate" (collaborative mode). max_drafts: lossless mode's bound on drafts in
        flight (unverified). draft_always: in lossless mode, when no exit is confident, draft from the split exit
        anyway (a rejected draft costs the same round trip as asking the cloud; an accepted one saves it).
        heartbeat_s: a cloud stream idle this long sends a heartbeat, so proxies keep it open (None: never)."""
        if mode not in MODES:
            raise UsageError(f"unknown mode {mode!r}; use one of {MODES}")
        if kv_fill not in KV_FILLS:
            raise UsageError(f"unknown kv_fill {kv_fill!r}; use one of {sorted(KV_FILLS)}")
        if max_drafts < 1:
            raise UsageError(f"max_drafts must be at least 1, got {max_drafts}")
        if kv_fill != "exact" and mode != "collaborative":
            raise UsageError(f"kv_fill {kv_fill!r} (--kv-fill) applies to collaborative mode only; mode {mode!r} "
                             f"always fills the cloud's KV exactly: drop it or use mode collaborative")
        if deadline_s <= 0:
            raise UsageError(f"the cloud deadline must be positive seconds, got {deadline_s}")
        if heartbeat_s is not None and heartbeat_s <= 0:
            raise UsageError(f"heartbeat_s must be positive seconds (or None: no heartbeats), got {heartbeat_s}")
        self.kv_fill, self.max_drafts, self.draft_always = kv_fill, max_drafts, draft_always
        self.heartbeat_s = heartbeat_s
        if encoding not in ENCODING_CODES:
            raise UsageError(f"unknown encoding {encoding!r}; use one of {sorted(ENCODING_CODES)}")
        self.backend, self.tokenizer, self.encoding = backend, tokenizer, encoding
        self.policy = policy or ExitPolicy.never()
        self.mode, self.deadline_s, self.retry_s, self.prefill_chunk = mode, deadline_s, retry_s, prefill_chunk
        self.cloud_exits = cloud_exits or {}
        root_cert = Path(tls_ca).read_bytes() if tls_ca else None  # PEM of the CA that signed the cloud's certificate
        self.link = CloudLink(cloud, token=token, deadline_s=deadline_s, root_cert=root_cert) if cloud else None
        self._info: pb.InfoReply | None = None  # the server's Info, asked once

    def info(self) -> pb.InfoReply:
        if self._info is None:
            self._info = self.link.info()
        return self._info

    def supports(self, feature: str) -> bool:
        """The server announces this protocol addition (asked once; False without a cloud or while it is
        unreachable)."""
        if self.link is None:
            return False
        try:
            return feature in self.info().features
        except CloudError:
            return False

    def heartbeat(self) -> float | None:
        """Seconds of idleness after which a stream sends a heartbeat, if the server announces the feature."""
        return self.heartbeat_s if self.heartbeat_s is not None and self.supports("heartbeat") else None

    def rows_per_append(self) -> int:
        return self.info().limits.max_rows_per_append or 4096

    def require(self, feature: str, what: str) -> None:
        """Refuse early when the server predates a protocol addition (it would ignore the new fields)."""
        if feature not in self.info().features:
            raise CloudError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"{what} needs a cloud that implements {feature!r}; this one ({self.info().version}) "
                             f"offers {list(self.info().features) or 'none'}: upgrade the server")

    @classmethod
    def from_checkpoint(cls, model_dir, cloud: str | None = None, backend: str = "torch",
                        backend_kw: dict | None = None, **kw) -> EdgeClient:
        """Build the backend by name; the default exit policy is DIR/exit_policy.json (coexit calibrate), and
        policy="adaptive" (with quality_budget=...) is the network-aware policy over its calibrated frontier.
        backend="gguf" without a layout in backend_kw takes the one that serves this policy and mode fastest
        (edge.backends.registry.gguf_layout)."""
        from coexit.checkpoint import load_tokenizer
        from edge.backends import make_backend
        from edge.backends.registry import gguf_layout
        from edge.policy.calibrate import POLICY_FILE, load_policy

        budget = kw.pop("quality_budget", None)
        adapter = kw.pop("adapter", None)  # a LoRA adapter directory (coexit.lora), on every backend
        if kw.get("policy") is None or kw.get("policy") == "adaptive":  # an adapter's own calibration first
            calibrated = adapter if adapter is not None and (Path(adapter) / POLICY_FILE).is_file() else model_dir
            kw["policy"] = load_policy(calibrated, adaptive=kw.get("policy") == "adaptive", quality_budget=budget,
                                       config_dir=model_dir)
        backend_kw = dict(backend_kw or {})
        if adapter is not None:
            backend_kw["adapter"] = adapter
        if backend == "gguf" and backend_kw.get("layout") is None:
            backend_kw["layout"] = gguf_layout(kw["policy"], kw.get("mode", "collaborative"), model_dir)
        return cls(make_backend(backend, model_dir, **backend_kw), load_tokenizer(model_dir), cloud=cloud, **kw)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()

    # ---- public API ----------------------------------------------------------------------------------------
    def generate(self, prompt: str | list[int], max_new_tokens: int = 32, sampling: SamplingParams = GREEDY,
                 policy: ExitPolicy | None = None, mode: str | None = None, stop_at_eos: bool = True) -> Generation:
        run = self._run(prompt, max_new_tokens, sampling, policy, mode, stop_at_eos, False)
        events = list(run)
        text = self.tokenizer.decode([e.token_id for e in events]) if self.tokenizer else ""
        return Generation(run.prompt_ids, events, text, run.counters)

    def stream(self, prompt: str | list[int], max_new_tokens: int = 32, sampling: SamplingParams = GREEDY,
               policy: ExitPolicy | None = None, mode: str | None = None, stop_at_eos: bool = True,
               provisional: bool = False) -> Iterator[TokenEvent]:
        """Yield each token as it is made, with its origin and timing; `.counters` of the iterator hold totals.

        Lossless mode yields only verified tokens, unless provisional=True: then each draft is also yielded when
        made (kind "draft"), a rejection first yields a "retract" event at the rejected position (every draft
        from there on is void), and every verified token still comes as a "token" event."""
        return self._run(prompt, max_new_tokens, sampling, policy, mode, stop_at_eos, provisional)

    def _run(self, prompt, max_new, sampling, policy, mode, stop_at_eos, provisional):
        mode = mode or self.mode
        policy = policy or self.policy
        if mode == "lossless":
            return LosslessRun(self, prompt, max_new, sampling, policy, stop_at_eos, provisional)
        if mode == "collaborative" and hasattr(policy, "speculate") and self.kv_fill == "exact" \
                and self.supports("verify"):  # the adaptive policy: drafts through costly fallbacks
            return LosslessRun(self, prompt, max_new, sampling, policy, stop_at_eos, provisional, speculative=True)
        return Run(self, prompt, max_new, sampling, policy, mode, stop_at_eos)


