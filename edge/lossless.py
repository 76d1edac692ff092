"""Lossless mode: the edge's exits draft tokens, the cloud verifies every one against the full model, and only
verified tokens are emitted (self-speculative decoding across the edge/cloud split).

The edge runs each new token through all its layers (the cloud needs the split row of every drafted position),
takes the first confident exit as the draft for the next position, and streams the row with its draft without
waiting: up to `max_drafts` drafts are in flight. With `draft_always` (the default) a row with no confident exit
is drafted from the split exit anyway, since a rejected draft costs no more waiting than asking the cloud.

Each reply carries verdicts (coexit.sampling.verify_draft on the cloud: greedy compares argmaxes; sampling applies
the speculative-sampling acceptance rule to the sparse draft distribution the edge sent). An accepted draft is
emitted as an edge token. At a rejected draft at position p the cloud's token replaces it, every later draft is
void (its replies are ignored: the server discards those rows without computing them), the edge rolls its KV back
to p, and a Rollback(p) tells the cloud to do the same. With no draft the row goes up with want_token and the edge
waits for the cloud's token.

Speculative collaborative mode (`speculative=True`, what collaborative mode with the adaptive policy runs): a
confident exit is final, as in collaborative mode (its row goes up without a draft and it is emitted once every
draft before it is verified); a token with no confident exit is, when the policy says fallbacks are expensive
(`AdaptivePolicy.speculate`), drafted from the split exit and verified instead of waited for. With greedy
sampling its tokens are those of collaborative mode with the same thresholds; it only stops paying a round trip
per fallback.

If the cloud becomes unreachable, drafts are dropped and the run reconnects (resume, or a new session with the
verified rows replayed) for up to `deadline_s` x 6 before raising: lossless never emits an unverified token.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from coexit.exits import AlsoAt
from coexit.sampling import draft_distribution, sample, sample_draft
from coexit.v1 import coexit_pb2 as pb
from edge.link import CloudUnavailable
from edge.run import Run, TokenEvent


@dataclass
class _Draft:
    position: int
    token: int
    exit_layer: int
    support: tuple[list[int], list[float]] | None
    verify: bool = True  # False: a confident exit taken as final (speculative collaborative mode)
    logprob: float = 0.0  # of a final exit's token
    verdict: tuple[int, float] | None = None  # (token, logprob) once the cloud accepted it


@dataclass
class _Sent:
    """A request in flight, in send order; `epoch` tells a reply made stale by a later rollback."""

    epoch: int
    drafted: bool = False  # carries a draft (for the last row)
    want: bool = False  # asks the token after its last row
    t0: float = 0.0  # when it was sent
    alone: bool = False  # nothing else was in flight: its round trip is a clean measurement
    nbytes: int = 0


class LosslessRun(Run):
    def __init__(self, client, prompt, max_new: int, sampling, policy, stop_at_eos: bool, provisional: bool,
                 speculative: bool = False) -> None:
        if client.draft_always and not speculative:
            policy = AlsoAt(policy, client.backend.split)
        super().__init__(client, prompt, max_new, sampling, policy, "lossless", stop_at_eos)
        self.provisional, self.speculative = provisional, speculative
        self.drafts: list[_Draft] = []  # unverified, at positions len(ids), len(ids) + 1, ...
        self.inflight: deque[_Sent] = deque()
        self.epoch = 0
        self.stepped = 0  # the backend holds rows [0, stepped)
        self.waiting = False  # the newest row went up without a draft: its token comes from the cloud
        self.events: deque[TokenEvent] = deque()
        self.last_emit = 0.0
        self.L = client.backend.config.num_hidden_layers
        self.eos = client.tokenizer.eos_id if client.tokenizer else None

    # ---- the loop ------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[TokenEvent]:
        be = self.c.backend
        be.reset()
        if not self.speculative:
            self.c.require("verify", "lossless mode")
        self.last_emit = time.perf_counter()
        try:
            while not self._done():
                if self.stream is None or self.stream.broken:
                    if self.speculative:  # collaborative semantics: carry on alone while the cloud is away
                        if not self._try_reconnect():
                            self._standalone_step()
                            while self.events:
                                yield self.events.popleft()
                            continue
                    else:
                        self._reconnect()  # raises CloudUnavailable when the cloud stays away
                try:
                    if self._can_step():
                        self._step()
                    else:
                        self._receive()
                except CloudUnavailable:
                    self._outage()
                while self.events:
                    yield self.events.popleft()
        finally:
            self.counters.edge_layer_tokens = be.layer_tokens
            self._finish()

    def _generated(self) -> int:
        return len(self.ids) - len(self.prompt_ids)

    def _done(self) -> bool:
        if self._generated() >= self.max_new:
            return True
        return self.stop_at_eos and self._generated() > 0 and self.ids[-1] == self.eos

    def _seq(self) -> list[int]:
        return self.ids + [d.token for d in self.drafts]

    def _can_step(self) -> bool:
        seq = self._seq()
        if self.waiting or self.stepped >= len(seq) or len(self.drafts) >= self.c.max_drafts:
            return False
        if self._generated() + len(self.drafts) >= self.max_new:
            return False  # every token still wanted is already drafted
        return not (self.stop_at_eos and self.drafts and self.drafts[-1].token == self.eos)

    # ---- edge side -----------------------------------------------------------------------------------------
    def _step(self) -> None:
        """Run the tokens without rows through the edge, draft the next token, and send the rows up."""
        be, seq, chunk = self.c.backend, self._seq(), self.c.prefill_chunk
        pos = self.stepped
        while len(seq) - pos > chunk:  # long prompts: earlier chunks need no exit decision
            be.step(seq[pos:pos + chunk], pos, None)
            pos += chunk
        t0 = time.perf_counter()
        res = be.step(seq[pos:], pos, self.policy.decide, to_split=True)
        if len(seq) - pos == 1:
            self.policy.observe_edge(time.perf_counter() - t0, True)
        self._collect_rows()
        self.stepped = len(seq)
        nxt = len(seq)  # the position the new draft (or the cloud's token) takes
        split = self.c.backend.split
        if self.speculative and res.exited:  # a confident exit is final: no verdict wanted
            token, logprob = sample(res.exit_logits[res.depth], self.sampling, position=nxt)
            self.drafts.append(_Draft(nxt, token, res.depth, None, verify=False, logprob=logprob))
            self._upload()
            self._release()
        elif res.exited or (self.speculative and self.policy.speculate()):
            layer = res.depth if res.exited else split
            support = draft_distribution(res.exit_logits[layer], self.sampling)
            draft = _Draft(nxt, sample_draft(*support, self.sampling, nxt), layer, support)
            self.drafts.append(draft)
            self.counters.drafts += 1
            self._upload(draft=draft)
            if self.provisional:
                text = self.c.tokenizer.decode([draft.token]) if self.c.tokenizer else ""
                self.events.append(TokenEvent(nxt, draft.token, text, "edge", draft.exit_layer, 0.0, 0.0, "draft"))
        else:
            self.counters.fallbacks += 1
            self._upload(want=True)
            self.waiting = True

    def _upload(self, draft: _Draft | None = None, want: bool = False) -> None:
        """Send rows [cloud_len, stepped) in Appends of at most the server's row limit; the last one carries the
        draft or asks for the token."""
        first, upto, per = self.cloud_len, self.stepped, self.c.rows_per_append()
        while first < upto:
            last = min(upto, first + per)
            tail = last == upto
            msg = self._append_request(first, self._rows(first, last), None, want and tail)
            if draft is not None and tail:
                d = msg.append.drafts.add(position=draft.position, token_id=draft.token)
                if not self.sampling.greedy:
                    d.support_ids.extend(draft.support[0])
                    d.support_probs.extend(draft.support[1])
            alone = not self.inflight
            self.stream.send(msg)
            self.inflight.append(_Sent(self.epoch, draft is not None and tail, want and tail, time.perf_counter(),
                                       alone, msg.ByteSize()))
            self.counters.uploads[-1].extend(range(first, last))
            first = self.cloud_len = last

    # ---- cloud side ----------------------------------------------------------------------------------------
    def _receive(self) -> None:
        if not self.inflight:
            raise RuntimeError("lossless run has nothing to step and nothing in flight")
        sent = self.inflight.popleft()
        reply = self.stream.recv()
        self.counters.merge_stream(self.stream)
        if sent.epoch != self.epoch or reply.WhichOneof("msg") != "appended":
            return  # a rollback's answer, or a reply made stale by a rollback
        a = reply.appended
        self._account(a)
        if sent.alone and (sent.want or sent.drafted):  # a clean round trip: tell the policy
            self.policy.observe(time.perf_counter() - sent.t0, a.compute_us / 1e6, a.queue_us / 1e6, sent.nbytes)
        for v in a.verdicts:
            self._release()
            d = self.drafts[0]
            assert v.position == d.position and d.verify, "verdicts must follow the drafts in order"
            if self.speculative:
                self.policy.observe_verdict(v.accepted)
            if not v.accepted:
                self._reject(v)
                return
            d.verdict = (v.token_id, v.logprob)
            self.counters.accepted += 1
        self._release()
        if sent.want and a.has_token:
            self.waiting = False
            self._emit(a.token_id, "cloud", a.exit_layer, a.logprob)

    def _release(self) -> None:
        """Emit the drafts at the front that need nothing more: accepted ones, and final exits."""
        while self.drafts and (not self.drafts[0].verify or self.drafts[0].verdict is not None):
            d = self.drafts.pop(0)
            token, logprob = d.verdict or (d.token, d.logprob)
            self._emit(token, "edge", d.exit_layer, logprob)

    def _reject(self, v: pb.Verdict) -> None:
        """The cloud's token replaces the draft at v.position; both sides forget every row from there on."""
        p = v.position
        self.counters.rejected += 1
        self.counters.wasted += sum(d.verify for d in self.drafts) - 1
        if self.provisional:
            self.events.append(TokenEvent(p, -1, "", "edge", 0, 0.0, 0.0, "retract"))
        self.drafts.clear()
        self._forget_from(p)
        self.epoch += 1  # every reply still in flight is stale
        self.stream.send(pb.SessionRequest(rollback=pb.RollbackRequest(length=p)))
        self.inflight.append(_Sent(self.epoch))
        self._emit(v.token_id, "cloud", self.L, v.logprob)

    def _forget_from(self, p: int) -> None:
        self.c.backend.truncate(p)
        if self.history_len > p:
            self.history_len = p  # rows from p on are overwritten as they come again
        self.stepped = min(self.stepped, p)
        self.cloud_len = min(self.cloud_len, p)
        self.waiting = False

    def _emit(self, token: int, origin: str, layer: int, logprob: float) -> None:
        pos = len(self.ids)
        self.ids.append(token)
        self.counters.exits[layer] += 1
        now = time.perf_counter()
        self.events.append(TokenEvent(pos, token, self._piece(token), origin, layer, logprob, now - self.last_emit))
        self.last_emit = now

    # ---- outages -------------------------------------------------------------------------------------------
    def _outage(self) -> None:
        """Drop drafts and in-flight requests and go back to the last verified token's row."""
        self._mark_down()
        if self.drafts:
            self.counters.wasted += sum(d.verify for d in self.drafts)
            if self.provisional:
                self.events.append(TokenEvent(self.drafts[0].position, -1, "", "edge", 0, 0.0, 0.0, "retract"))
            self.drafts.clear()
        self.inflight.clear()
        self.epoch += 1
        self._forget_from(len(self.ids) - 1)  # re-running the last verified token drafts the next one again

    def _reopen(self) -> None:
        """Resume the session (rolled back to the rows the edge keeps) or open a new one."""
        self._open()
        if self.cloud_len:  # a resumed session: drop rows past the edge's, and any pending rejection
            keep = min(self.cloud_len, self.stepped)
            self.stream.request(pb.SessionRequest(rollback=pb.RollbackRequest(length=keep)))
            self.cloud_len = keep

    def _reconnect(self) -> None:
        """Lossless: wait for the cloud, retrying every retry_s; give up after deadline_s x 6."""
        give_up = time.monotonic() + 6 * self.c.deadline_s
        while True:
            try:
                self.retry_at = min(self.retry_at, time.monotonic())
                self._reopen()
                return
            except CloudUnavailable:
                self._mark_down()
                if time.monotonic() > give_up:
                    raise
                time.sleep(self.c.retry_s)

    def _try_reconnect(self) -> bool:
        """Speculative collaborative mode: one attempt once retry_s has passed since the last failure."""
        if time.monotonic() < self.retry_at:
            return False
        try:
            self._reopen()
            return True
        except CloudUnavailable:
            self._mark_down()
            return False

    def _standalone_step(self) -> None:
        """The cloud is away: the next token from the edge's own exits, marked edge-standalone (as in
        collaborative mode); its row is kept for the cloud's return."""
        be, seq = self.c.backend, self._seq()
        res = be.step(seq[self.stepped:], self.stepped, self.policy.decide, to_split=True)
        self._collect_rows()
        self.stepped = len(seq)
        layer, token, logprob = self._edge_token(res, len(seq))
        self.counters.standalone += 1
        self._emit(token, "edge-standalone", layer, logprob)

    def _finish(self) -> None:
        """Collect the replies still in flight, then close the session."""
        if self.stream is None:
            return
        try:
            while self.inflight and not self.stream.broken:
                self.inflight.popleft()
                self.stream.recv()
        except CloudUnavailable:
            pass
        self._close()

