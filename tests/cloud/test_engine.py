"""The batching engine: batched serving gives the same tokens (and logits within the cache tests' tolerance) as
serving each session alone with its own contiguous KV cache; blocks return to the pool; a long upload is chunked
so other sessions' decode steps are not held up.

COEXIT_TEST_DEVICE=cuda runs the model, the pool and the rows on a GPU (CUDA graphs and the overlap lane's stream
then take their GPU paths); bench/gpu_engine.sh runs the tests that compare with sessions alone that way. CI, with
no GPU, runs everything on the CPU."""

from __future__ import annotations

import dataclasses
import gc
import os
import threading
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch

from cloud.engine.engine import Engine, SegmentDone
from cloud.engine.kv_pool import KVPool, PagedCache
from cloud.engine.runner import BatchedRunner
from cloud.engine.scheduler import Draft, Scheduler, Segment, prompt_turn
from cloud.engine.staging import PromptRing, StagedRows
from cloud.errors import ServiceError
from cloud.sessions import Limits, SessionManager
from coexit.config import Config
from coexit.decoding import LayerRunner
from coexit.exits import ExitPolicy, confidence
from coexit.sampling import GREEDY, SamplingParams, sample
from coexit.tiny import random_model

ATOL = 1e-4
DEVICE = torch.device(os.environ.get("COEXIT_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return random_model(dataclasses.replace(Config.flavour("tiny"), max_position_embeddings=8192), seed=1).to(DEVICE)


def scratch_blocks(static_decode: str) -> int:
    """Blocks the static step keeps for padded rows: one when it pads to buckets (eager, or a GPU's graphs)."""
    return int(static_decode == "eager" or (static_decode == "auto" and DEVICE.type == "cuda"))


def hidden_rows(model, n: int, seed: int) -> torch.Tensor:
    """Split-layer rows of a random token sequence, as the edge would send them."""
    ids = torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    with torch.no_grad():
        return model.stage(0, model.config.split_layer)(ids).hidden[0]


class Harness:
    """Sessions on a real engine; `step` queues one Append per session under the engine lock, so they all land
    in the same ticks, then waits for every answer."""

    def __init__(self, model, blocks: int, block_size: int = 4, rows_per_tick: int = 256,
                 static_decode: str = "off", overlap: str = "off") -> None:
        cfg = model.config
        self.pool = KVPool(blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, torch.float32, DEVICE)
        self.engine = Engine(model, self.pool, rows_per_tick, static_decode=static_decode, overlap=overlap)
        self.manager = SessionManager(model, Limits(max_sessions=16), self.engine)

    def submit(self, s, rows, first, want=True, sampling=GREEDY, top_k=0):
        box, ev = {}, threading.Event()

        def waiter(outcome):
            box["out"] = outcome
            ev.set()

        if want and rows.shape[0] == 1:  # a decode row stays on the host, as LocalBackend.segment leaves it (on a
            rows = rows.cpu()  # GPU the engine stages it there and copies a tick's rows over at once)
        seg = Segment(first, rows, want, sampling, top_k, waiter=waiter if want else None)
        self.manager.submit(s, seg)
        return (box, ev) if want else None

    def step_async(self, work):
        """Queue one Append per entry of work ([(session, rows, first)]), all in one tick, greedy, wanting a
        token; returns their (outcome box, event)s."""
        with self.engine.lock:
            return [self.submit(*w) for w in work]

    def step(self, work):
        """work: [(session, rows, first, want, sampling)] -> outcomes (SegmentDone or exception) of the Appends
        that want a token, in order."""
        with self.engine.lock:
            waits = [w for w in (self.submit(*w) for w in work) if w is not None]
        outs = []
        for box, ev in waits:
            if ev.wait(30) is False:
                raise TimeoutError("the engine did not answer")
            outs.append(box["out"])
        return outs

    def close(self):
        self.engine.stop()


class Alone:
    """The reference: one session served alone, LayerRunner over a contiguous KVCache (the pre-engine path)."""

    def __init__(self, model, start: int, policy: ExitPolicy) -> None:
        self.model, self.policy = model, policy
        self.runner = LayerRunner(model, start, model.config.num_hidden_layers, max_len=4096)

    def step(self, x, first, sampling=GREEDY):
        p = self.policy
        res = self.runner.run(x, first, p.decide if p.thresholds else None, sorted(p.thresholds))
        logits = res.logits if res.logits is not None else res.exit_logits[res.depth]
        return sample(logits, sampling, position=first + x.shape[0]), res.depth, logits


def close_checking_kv(h: Harness, model, pairs, static_decode: str) -> None:
    """Each session's deep-layer KV equals its reference's (served alone); then close them all: every block but
    the static step's scratch ones comes back."""
    cfg = model.config
    for s, alone in pairs:
        for layer in range(cfg.split_layer, cfg.num_hidden_layers):
            for got, want in zip(s.cache.get(layer), alone.runner.cache.get(layer)):
                torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        h.manager.close(s)
    assert h.pool.num_free == h.pool.num_blocks - scratch_blocks(static_decode)


def test_paged_cache_alone_equals_contiguous(model):
    cfg = model.config
    pool = KVPool(64, 4, cfg.num_key_value_heads, cfg.head_dim, torch.float32, DEVICE)
    split, L = cfg.split_layer, cfg.num_hidden_layers
    paged = LayerRunner(model, split, L, cache=PagedCache(pool, range(split, L)))
    ref = LayerRunner(model, split, L, max_len=64)
    rows = hidden_rows(model, 13, seed=3)
    for first, stop in ((0, 9), (9, 10), (10, 13)):
        paged.cache.grow(stop)
        a, b = paged.run(rows[first:stop], first), ref.run(rows[first:stop], first)
        torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=0)
    for layer in range(split, L):
        for got, want in zip(paged.cache.get(layer), ref.cache.get(layer)):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    paged.cache.truncate(5)
    assert pool.num_used == 2 * (L - split)  # ceil(5 / 4) blocks per layer stay
    paged.cache.release()
    assert pool.num_free == pool.num_blocks


@pytest.mark.parametrize("static_decode,overlap", [("off", "off"), ("auto", "off"), ("auto", "on")])
def test_batched_sessions_equal_sessions_alone(model, static_decode, overlap):
    """Mixed sessions in the same ticks: prompt lengths, queued rows without a token, parked catch-up rows at a
    cloud exit, token-id input, sampling, a session opening and one closing mid-run, one that runs out of blocks.
    With the static step ("auto"), the plain decode rows among them take it in the same ticks."""
    cfg = model.config
    split, L = cfg.split_layer, cfg.num_hidden_layers
    h = Harness(model, blocks=100, static_decode=static_decode, overlap=overlap)
    try:
        # a cloud-exit threshold that some rows pass and some do not
        probe = LayerRunner(model, split, L, max_len=64)
        probe_rows = hidden_rows(model, 24, seed=2)
        conf = []
        for i in range(24):
            conf.append(confidence(probe.run(probe_rows[i:i + 1], i, exits=[4]).exit_logits[4], "max_prob"))
        exit4 = ExitPolicy({4: sorted(conf)[len(conf) // 2]})
        ids = torch.randint(3, cfg.vocab_size, (30,), generator=torch.Generator().manual_seed(9)).to(DEVICE)
        specs = {  # name: (prompt len, decode steps, token input, policy, sampling, opens at step)
            "long": (20, 6, False, ExitPolicy(), SamplingParams(), 0),
            "exits": (5, 8, False, exit4, SamplingParams(), 0),
            "tokens": (8, 6, True, ExitPolicy(), SamplingParams(), 0),
            "sampled": (12, 6, False, ExitPolicy(), SamplingParams(temperature=0.9, top_k=20, seed=3), 0),
            "late": (3, 4, False, ExitPolicy(), SamplingParams(temperature=1.2, top_p=0.9, seed=1), 3),
        }
        data = {name: (ids if tok else hidden_rows(model, 30, seed=i)) for i, (name, (_, _, tok, *_))
                in enumerate(specs.items())}
        sessions, alone, pos, mismatches, exited = {}, {}, {}, [], 0
        for step in range(9):
            if step == 4:  # "long" closes while the others keep going
                h.manager.close(sessions.pop("long"))
            work, names = [], []
            for name, (prompt, steps, tok, policy, sampling, opens) in specs.items():
                if step == opens:
                    sessions[name] = h.manager.open(32, "fp32", tok, False, dict(policy.thresholds))
                    alone[name] = Alone(model, 0 if tok else split, policy)
                    pos[name] = 0
                if name not in sessions or step - opens > steps:
                    continue
                n = prompt if pos[name] == 0 else 1
                x = data[name][pos[name]:pos[name] + n]
                if name == "exits" and pos[name] == 0:  # rows queued without a token first, then the rest
                    work.append((sessions[name], x[:3], 0, False, sampling))
                    alone[name].runner.park(x[:3], 0)
                    x, pos[name] = x[3:], 3
                work.append((sessions[name], x, pos[name], True, sampling))
                names.append((name, x, pos[name], sampling))
                pos[name] += x.shape[0]
            outs = h.step(work)
            assert len(outs) == len(names)
            for (name, x, first, sampling), out in zip(names, outs):
                assert isinstance(out, SegmentDone), out
                (token, logprob), depth, logits = alone[name].step(x, first, sampling)
                exited += depth == 4
                if (out.token.token_id, out.token.exit_layer) != (token, depth):
                    mismatches.append((name, step, out.token.token_id, token, out.token.exit_layer, depth))
                torch.testing.assert_close(out.token.logits, logits, atol=ATOL, rtol=0)
                assert abs(out.token.logprob - logprob) < ATOL
        assert not mismatches, mismatches
        assert exited > 0, "no row stopped at the cloud exit: the catch-up path went untested"
        assert h.engine.metrics.tick_sessions._sum.get() > h.engine.ticks, "no tick ever batched several sessions"
        if static_decode == "auto":
            assert h.engine.scheduler.mixed_ticks > 0, "no decode row took the static step beside other work"

        # one session asks for more positions than the pool has free: it alone is refused, intact
        big = h.manager.open(64, "fp32", False, False, {})
        free_before = h.pool.num_free
        rows = hidden_rows(model, 4 * (free_before // (L - split) + 1), seed=7)
        (out,) = h.step([(big, rows, 0, True, SamplingParams())])
        assert isinstance(out, ServiceError) and out.code == grpc.StatusCode.RESOURCE_EXHAUSTED, out
        assert "KV budget is full" in out.message
        assert big.length == 0 and h.pool.num_free == free_before
        (out,) = h.step([(big, rows[:4], 0, True, SamplingParams())])  # and it still works within the pool
        assert isinstance(out, SegmentDone)
        for s in [*sessions.values(), big]:
            h.manager.close(s)
        assert h.pool.num_free == h.pool.num_blocks - scratch_blocks(static_decode)
    finally:
        h.close()


def test_static_decode_step_equals_sessions_alone(model):
    """The static-shape decode step (what a GPU captures as a CUDA graph), run eagerly here: padded to a batch
    bucket and a table-width bucket, it gives the same logits, tokens and KV as each session alone."""
    cfg = model.config
    h = Harness(model, blocks=400, static_decode="eager")
    graphs = h.engine.runner.graphs
    try:
        prompts = (3, 9, 17, 30, 64)  # tables of 1 to 17 blocks
        sessions = [h.manager.open(128, "fp32", False, False, {}) for _ in prompts]
        alone = [Alone(model, cfg.split_layer, ExitPolicy()) for _ in prompts]
        data = [hidden_rows(model, n + 8, seed=10 + i) for i, n in enumerate(prompts)]
        outs = h.step([(s, d[:n], 0, True, GREEDY) for s, d, n in zip(sessions, data, prompts)])
        assert graphs.replays == 0 and h.engine.runner.mixed.steps == 1  # the prompts take the mixed pass
        for step in range(8):
            if step == 4:  # one session leaves: the batch shrinks into another bucket
                h.manager.close(sessions.pop(1))
                alone.pop(1), data.pop(1)
                prompts = prompts[:1] + prompts[2:]
            outs = h.step([(s, d[n + step:n + step + 1], n + step, True, GREEDY)
                           for s, d, n in zip(sessions, data, prompts)])
            for a, d, n, out in zip(alone, data, prompts, outs):
                if step == 0:
                    a.step(d[:n], 0)
                (token, _), _, logits = a.step(d[n + step:n + step + 1], n + step)
                assert out.token.token_id == token
                torch.testing.assert_close(out.token.logits, logits, atol=ATOL, rtol=0)
        assert graphs.replays == 8
        for s, a in zip(sessions, alone):
            for layer in range(cfg.split_layer, cfg.num_hidden_layers):
                for got, want in zip(s.cache.get(layer), a.runner.cache.get(layer)):
                    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        for s in sessions:
            h.manager.close(s)
        assert h.pool.num_free == h.pool.num_blocks - 1  # all but the scratch block of padded rows
    finally:
        h.close()


def test_long_upload_does_not_stall_other_decode_steps(model):
    h = Harness(model, blocks=4000, block_size=16, rows_per_tick=64)
    try:
        a = h.manager.open(4096, "fp32", False, False, {})
        b = h.manager.open(4096, "fp32", False, False, {})
        rows_a, rows_b = hidden_rows(model, 40, seed=1), hidden_rows(model, 4000, seed=2)
        (first,) = h.step([(a, rows_a[:8], 0, True, SamplingParams())])
        alone = first.ticks[1] - first.ticks[0]  # ticks one decode step takes with nobody else
        big_box, big_ev = h.submit(b, rows_b, 0)
        waits = []
        for i in range(8, 20):
            (out,) = h.step([(a, rows_a[i:i + 1], i, True, SamplingParams())])
            waits.append(out.ticks[1] - out.ticks[0])
        last_decode_tick = out.ticks[1]
        # a prompt queued after the upload (a segment that fits the budget) does not wait for it: it shares the
        # budget with the upload's share
        p = h.manager.open(4096, "fp32", False, False, {})
        (prompt,) = h.step([(p, rows_a[:40], 0, True, GREEDY)])
        assert isinstance(prompt, SegmentDone) and prompt.ticks[1] - prompt.ticks[0] <= 1, prompt.ticks
        assert not big_ev.is_set(), "the prompt was answered only after the upload"
        assert big_ev.wait(120)
        big = big_box["out"]
        assert isinstance(big, SegmentDone)
        assert big.ticks[1] - big.ticks[0] >= 4000 // 64 - 1, "the upload was not chunked"
        assert max(waits) <= alone + 2, waits
        assert last_decode_tick < big.ticks[1], "the decode steps did not overlap the upload"

        # a session closed while its upload is being computed: its blocks come back once its tick ends, and the
        # session still decoding is unaffected
        c = h.manager.open(4096, "fp32", False, False, {})
        held_by_others = h.pool.num_used
        box, ev = h.submit(c, rows_b, 0)
        while c.queue and c.queue[0].done_rows < 640:
            time.sleep(0.01)
        h.manager.close(c)
        assert ev.wait(5) and isinstance(box["out"], ServiceError) and box["out"].code == grpc.StatusCode.NOT_FOUND
        (out,) = h.step([(a, rows_a[20:21], 20, True, GREEDY)])
        assert isinstance(out, SegmentDone)
        deadline = time.monotonic() + 10
        while h.pool.num_used != held_by_others and time.monotonic() < deadline:
            time.sleep(0.01)
        assert h.pool.num_used == held_by_others
    finally:
        h.close()


def test_fair_grants():
    s = Scheduler(row_budget=10)
    assert s.grants([1, 1, 100]) == [1, 1, 8]
    assert s.grants([100, 100]) == [5, 5]
    assert s.grants([1] * 12) == [1] * 10 + [0, 0]
    assert s.grants([3, 0, 2]) == [3, 0, 2]
    # prompts (a turn: they fit the budget) past the share are served first come, first served, after round one;
    # longer uploads (None) get the share, then split what the prompts leave
    assert s.grants([1, 6, 6, 100], turns=[0, 2, 1, None]) == [1, 1, 6, 2]
    assert s.grants([6, 6, 100], turns=[4, 3, None]) == [1, 6, 3]
    assert s.grants([2, 30], turns=[5, 0]) == [2, 8]  # within the share: served in round one, whatever its turn
    assert s.grants([3, 100, 100], turns=[0, None, None]) == [3, 4, 3]
    assert s.grants([100, 100], turns=[None, None]) == [5, 5]  # no prompts: max-min as before
    # more sessions than rows: the round-robin order decides, prompts included (served sessions go to the back, so
    # a prompt is not left behind decode rows that fill every tick)
    assert s.grants([30] + [1] * 11, turns=list(range(12))) == [1] * 10 + [0, 0]
    # a burst (more sessions wanting rows than rows), with every segment's turn (`order`): all but an eighth of the
    # rows (at least 1) first come, first served, longer uploads included; the rest one row each, in round-robin
    # order, to the sessions not served
    s = Scheduler(row_budget=16)
    order = [(True, 3), (False, 7), (True, 0), (True, 1)] + [(True, 10 + i) for i in range(16)]
    assert s.grants([6, 3, 40, 1] + [2] * 16, order=order) == [1, 3, 11, 1] + [0] * 16
    assert s.grants([6, 3, 40, 1] + [2] * 16) == [1] * 16 + [0] * 4  # without turns: one row each


def test_prompt_turns_put_sessions_waiting_for_a_token_first_then_arrival_order():
    """Among prompts past the share: segments of sessions under way that wait for a token or verdicts first, then
    the rest, each in the order queued; an upload longer than the row budget has no turn (it splits max-min)."""
    rows = torch.zeros(6, 4)
    segs = {"new prompt": Segment(0, rows, True), "catch-up": Segment(40, rows, True),
            "upload, no token": Segment(40, rows, False), "drafts": Segment(40, rows, False, drafts=[Draft(44, 7)]),
            "later new prompt": Segment(0, rows, True), "long upload": Segment(0, torch.zeros(300, 4), True)}
    for arrival, seg in enumerate(segs.values()):
        seg.arrival = arrival
    seg_order = sorted((name for name in segs if prompt_turn(segs[name], 256) is not None),
                       key=lambda name: prompt_turn(segs[name], 256))
    assert seg_order == ["catch-up", "drafts", "new prompt", "upload, no token", "later new prompt"]
    assert prompt_turn(segs["long upload"], 256) is None and prompt_turn(segs["long upload"], 300) is not None


def test_decode_batch_successor_keeps_rows_and_changes_only_what_came_and_went():
    """A tick's decode batch made from the last one: staying sessions keep their rows (their block tables stay in
    the static step's buffers), newcomers fill the rows of those that left, rows left open are filled from the
    end, and slots and lookups match the rows, as a batch built from scratch would hold them."""
    from types import SimpleNamespace

    from cloud.engine.scheduler import DecodeBatch

    def session(i):
        return SimpleNamespace(id=f"s{i:02d}", runner=SimpleNamespace(cache=SimpleNamespace(slot=100 + i)))

    every = {i: session(i) for i in range(20)}
    batch = DecodeBatch([every[i] for i in range(8)])
    assert batch.successor({f"s{i:02d}": every[i] for i in range(8)}) is batch  # nothing changed: the same batch
    for keep, new in (({0, 1, 2, 4, 5, 6, 7}, {9, 8}), ({0, 1, 4, 6, 7, 8, 9}, set()), ({0, 9}, {10, 11, 12}),
                      (set(), {13}), ({13}, set(range(14, 20)))):
        plain = {f"s{i:02d}": every[i] for i in sorted(keep | new)}
        nxt = batch.successor(plain)
        ids = [s.id for s in nxt.sessions]
        assert sorted(ids) == sorted(plain) and None not in nxt.sessions
        for i, s in enumerate(batch.sessions):  # only rows past the new end move (into rows left open)
            if s.id in plain and i < len(nxt.sessions):
                assert nxt.sessions[i] is s, (i, s.id)
        fresh = DecodeBatch(nxt.sessions)
        assert nxt.slots.tolist() == fresh.slots.tolist() and nxt.by_id == fresh.by_id
        assert nxt.row_of == fresh.row_of
        batch = nxt


def test_grants_with_decode_rows_apart_equal_grants_over_everyone():
    """The scheduler grants the plain decode rows their one row each and splits the rest over the other sessions
    with the first round's share of the whole set: the same grants as splitting over everyone in round-robin
    order, whenever the ready sessions fit the budget. (When the others want more than that rest, the scheduler
    gives them up to half the budget instead: test_a_prompt_joining_decode_sessions_just_under_the_row_budget.)"""
    rng = torch.Generator().manual_seed(3)
    for _ in range(500):
        budget = int(torch.randint(1, 40, (1,), generator=rng))
        k = int(torch.randint(1, budget + 1, (1,), generator=rng))
        plain = (torch.rand(k, generator=rng) < 0.6).tolist()
        needs = [1 if p else int(torch.randint(1, 30, (1,), generator=rng)) for p in plain]
        turns = [int(a) if a % 3 else None for a in torch.randperm(k, generator=rng)]  # (None: a longer upload)
        s = Scheduler(row_budget=budget)
        whole = s.grants(needs, turns=turns)
        others = [(n, a) for n, a, p in zip(needs, turns, plain) if not p]
        apart = iter(s.grants([n for n, _ in others], budget - sum(plain), max(1, budget // k),
                              [a for _, a in others]))
        assert whole == [1 if p else next(apart) for p in plain], (budget, needs, plain)
        assert sum(whole) == min(budget, sum(needs))
        share = max(1, budget // k)
        queued = sorted((a, i) for i, a in enumerate(turns) if a is not None and needs[i] > share)  # past the share
        served = [whole[i] for _, i in queued]  # first come, first served: in full, then one cut, then none
        full = next((j for j, (_, i) in enumerate(queued) if served[j] < needs[i]), len(queued))
        assert all(g == 0 for g in served[full + 1:]), (budget, needs, turns, whole)


def test_staged_rows_come_back_by_slot_exactly_and_pack_with_prompt_rows():
    """Decode rows staged by KV slot (staging.py) come back in the tick's order with the exact values sent, in any
    hidden dtype, gathered or copied into a step's buffer, with their segments and what is read of them; a mixed
    pass's input built without the PromptRing holds the prompt chunks' rows, then them, as one cat would."""
    staged, g = StagedRows(), torch.Generator().manual_seed(3)
    sent = {slot: torch.randn(1, 16, generator=g).to(dtype)
            for slot, dtype in [(5, torch.float16), (0, torch.float32), (130, torch.bfloat16)]}  # 130: a grow
    hot = SamplingParams(temperature=0.7, seed=9)
    segs = {5: Segment(7, sent[5], True, sampling=hot, waiter=SimpleNamespace(key=(2 << 48) | 41)),
            0: Segment(7, sent[0], True, waiter=lambda outcome: None),  # a waiter with no key: -1
            130: Segment(7, torch.zeros(1, 16), True, sampling=hot)}
    for slot, seg in segs.items():
        staged.put(slot, seg)
    segs[130] = Segment(7, sent[130], True, waiter=SimpleNamespace(key=12))  # restaged: what a slot holds changes
    staged.put(130, segs[130])
    order = np.array([130, 5, 0])
    rows = staged.at(order)
    want = torch.cat([sent[int(slot)].float() for slot in order])
    assert torch.equal(rows.gather(), want)
    assert all(a is segs[int(slot)] for a, slot in zip(rows.segments, order))
    assert rows.drawn.tolist() == [1] and rows.sampling() == [hot]  # only the row at slot 5 draws a sample
    assert rows.keys.tolist() == [12, (2 << 48) | 41, -1]
    assert rows.submitted.tolist() == [segs[int(slot)].submitted for slot in order]
    for dtype in (torch.float32, torch.bfloat16):  # straight into a step's input buffer (a view), in its dtype
        buf = torch.zeros(5, 1, 16, dtype=dtype)
        rows.into(buf[:3, 0])
        assert torch.equal(buf[:3, 0], want.to(dtype)) and not buf[3:].any()
    chunks = [torch.randn(3, 16, generator=g), torch.randn(2, 16, generator=g).half()]
    for xs in (chunks[:1], chunks):  # all float32 (one cat), or not (copied chunk by chunk)
        items = [SimpleNamespace(x=x) for x in xs]
        order, packed, region, decode_first = BatchedRunner._packed_rows(None, rows, items)
        assert order == items and region is None and not decode_first
        assert torch.equal(packed, torch.cat([*(x.float() for x in xs), want]))


def test_prompt_ring_reads_chunks_in_place_and_packs_what_a_cat_would():
    """Prompt rows staged in the PromptRing: a mixed pass's input is a view of the ring over the longest run of
    its chunks that lie one after the other, at the newest staged rows (decode rows and other chunks copied after
    it) or from the oldest held rows (copied before it, decode rows first); its values are those of a cat of the
    chunks in the order returned and of the decode rows; the ring's space comes back once every region is given
    back, and a tick with no such run copies everything into a new tensor."""
    g = torch.Generator().manual_seed(4)
    ring = PromptRing(64)  # 16 rows kept free before the first region
    staged, decode = StagedRows(), {}
    for slot in (2, 7):
        decode[slot] = Segment(9, torch.randn(1, 16, generator=g), True)
        staged.put(slot, decode[slot])
    rows = staged.at(np.array([7, 2]))
    want_decode = torch.cat([decode[7].rows, decode[2].rows])
    sent = {name: torch.randn(n, 16, generator=g) for name, n in (("a", 5), ("b", 4), ("c", 6))}
    views, regions = {}, {}
    for name, x in sent.items():
        views[name], regions[name] = ring.stage(x)
        assert torch.equal(views[name], x) and views[name].data_ptr() != x.data_ptr()
    assert [r[:2] for r in regions.values()] == [[16, 21], [21, 25], [25, 31]] and ring.top == 31
    assert ring.stage(torch.randn(3, 16).half()) is None and ring.stage(torch.randn(3, 8)) is None  # not staged

    def pack(*xs):
        items = [SimpleNamespace(x=x) for x in xs]
        order, h, region, decode_first = BatchedRunner._packed_rows(ring, rows, items)
        got = [it.x.float() for it in order]
        assert torch.equal(h, torch.cat([want_decode, *got] if decode_first else [*got, want_decode]))
        names = [next((k for k, v in views.items() if v.data_ptr() <= it.x.data_ptr() < v.data_ptr() + v.nbytes),
                      "new") for it in order]
        return names, h, region, decode_first

    # the whole tick in place, at the newest rows: only the decode rows are copied, after the chunks
    order, h, region, first = pack(views["c"], views["a"], views["b"])
    assert order == ["a", "b", "c"] and not first and h.data_ptr() == views["a"].data_ptr()
    assert region[:2] == [31, 33] and ring.top == 33
    ring.release(region)
    assert ring.top == 31  # the newest region given back: its rows are the next region's
    # the newest prompt cut by the row budget: the run from the oldest held rows, decode rows and the rest before
    extra = torch.randn(2, 16, generator=g).half()  # (a chunk that is not in the ring: copied)
    order, h, region, first = pack(views["a"], views["b"][:2], extra)
    assert first and order == ["new", "a", "b"] and region[:2] == [12, 16]
    assert h.data_ptr() == ring.rows[12].data_ptr() and h.shape[0] == 2 + 2 + 5 + 2
    ring.release(region)
    # a's rows were read: the run may start where its segment goes on (its rows before are given up)
    order, h, region, first = pack(views["b"], views["a"][3:])
    assert first and order == ["a", "b"] and region[:2] == [17, 19] and h.data_ptr() == ring.rows[17].data_ptr()
    ring.release(region)
    # nothing at either end: a new tensor, the chunks in their own order
    order, h, region, first = pack(views["b"][1:], extra)
    assert region is None and not first and order == ["b", "new"]
    assert ring.in_place == 3
    assert ring.stage(torch.randn(40, 16)) is None  # no room left at either end: the rows stay where they are
    for name in ("b", "a", "c"):
        assert ring.held
        ring.release(regions[name])
    assert ring.held == 0
    view, region = ring.stage(sent["a"])  # an empty ring starts again after its free rows
    assert region[:2] == [16, 21]
    small = PromptRing(64, max_bytes=32 * 16 * 4)  # at most this many bytes: 32 rows of 16 float32
    assert small.stage(torch.randn(3, 16))[1][:2] == [8, 11] and small.capacity == 32
    assert small.stage(torch.randn(30, 16)) is None


def test_lockstep_ranks_stage_no_prompt_rows_and_still_serve_mixed_ticks(model):
    """Under tensor parallelism (Engine.lockstep) prompt rows stay where they arrived, so a pass's layout does not
    depend on when Appends land during a tick; mixed ticks still give each session's tokens as served alone."""
    cfg = model.config
    h = Harness(model, blocks=400, block_size=4, static_decode="eager")
    h.engine.lockstep()
    try:
        a, b = (h.manager.open(128, "fp32", False, False, {}) for _ in range(2))
        alone = {s.id: Alone(model, cfg.split_layer, ExitPolicy()) for s in (a, b)}
        rows = {s.id: hidden_rows(model, 12, seed=60 + i) for i, s in enumerate((a, b))}
        plan = [[(a, 0, 6)], [(a, 6, 1), (b, 0, 8)], [(a, 7, 1), (b, 8, 1)]]  # b's prompt rides a mixed tick
        for work in plan:
            items = [(s, rows[s.id][first:first + n], first, True, GREEDY) for s, first, n in work]
            for (s, x, first, *_), out in zip(items, h.step(items)):
                (token, _), _, _ = alone[s.id].step(x, first)
                assert out.token.token_id == token
        assert h.engine.runner.mixed.steps >= 1, "b's prompt did not ride a mixed pass"
        assert h.engine.scheduler.prompts is None
    finally:
        h.close()


def test_grow_slots_gives_each_table_its_blocks_at_once_or_nothing():
    """A tick's prompt chunks get their blocks in one allocation (KVPool.grow_slots): every layer's table ends
    holding exactly the blocks its positions need, blocks already held stay where they were, no block is handed
    out twice, and when the pool is short nothing is taken."""
    pool = KVPool(400, 4, 1, 8, torch.float32)
    layers = range(2, 5)
    caches = [PagedCache(pool, range(0, 5)) for _ in range(6)]
    for i, c in enumerate(caches):  # different lengths held, and a lagging layer (tokens that exited early)
        c.grow(3 * i, c.blocks_needed(3 * i))
        if i % 2:
            pool.release(c.table(4)[1:].tolist())
            pool.tables.nblocks[4, c.slot] = min(1, int(pool.tables.nblocks[4, c.slot]))
    before = {(c.slot, layer): c.table(layer).tolist() for c in caches for layer in layers}
    free = pool.num_free
    uptos = [5, 17, 9, 30, 2, 23]
    slots = np.array([c.slot for c in caches])
    assert pool.grow_slots(slots, np.array(uptos), layers)
    handed = []
    for c, upto in zip(caches, uptos):
        for layer in layers:
            table, old = c.table(layer).tolist(), before[(c.slot, layer)]
            assert len(table) == max(len(old), -(-upto // 4)) and table[:len(old)] == old
            handed += table[len(old):]
    assert len(handed) == len(set(handed)) == free - pool.num_free
    assert not set(handed) & {b for t in before.values() for b in t} and not set(handed) & set(pool._free)
    assert not pool.grow_slots(slots, np.array(uptos) + 4 * pool.num_free, layers)  # short: nothing taken
    assert pool.num_free == free - len(handed)


@pytest.mark.parametrize("static_decode", ["auto", "eager"])  # eager: bucketed buffers, as a GPU's graphs use
def test_churn_while_others_decode_equals_sessions_alone(model, static_decode):
    """Sessions open (with prompts) and close while others decode, on the engine's steady path (a reused plan,
    the static step at exact shapes, rows crossing 4-position blocks), and prompt chunks ride mixed passes with the
    decode rows: first prompts, a long prompt chunked over ticks, several rows appended mid-stream (as after
    tokens that exited on the edge), and decode rows queued before the one ahead was answered (staged for the
    static step when that one settles). Every token, log-probability and logit equals serving that session
    alone, and the blocks all come back."""
    cfg = model.config
    h = Harness(model, blocks=2000, block_size=4, rows_per_tick=32, static_decode=static_decode)
    rng = torch.Generator().manual_seed(5)
    try:
        live, born = {}, 0  # name: [session, Alone, rows, position, sampling]

        def open_one():
            nonlocal born
            prompt = 45 if born == 4 else int(torch.randint(1, 12, (1,), generator=rng))  # born 4: chunked
            sampling = SamplingParams(temperature=0.8, top_k=30, seed=born) if born % 3 == 2 else GREEDY
            live[born] = [h.manager.open(128, "fp32", False, False, {}),
                          Alone(model, cfg.split_layer, ExitPolicy()), hidden_rows(model, prompt + 40, seed=100 + born),
                          0, sampling, prompt]
            born += 1

        for _ in range(6):
            open_one()
        checked = 0
        for step in range(40):
            if step % 8 == 7:  # churn: one closes, two open; the others keep decoding through it
                h.manager.close(live.pop(min(live))[0])
                open_one()
                open_one()
            elif step % 8 == 3:  # one opens while every planned session queues its decode row
                open_one()
            work, names = [], []
            for name, (s, _alone, rows, pos, sampling, prompt) in live.items():
                n = prompt if pos == 0 else 3 if step % 8 == 7 and name % 2 == 0 else 1
                if pos + n > rows.shape[0]:
                    continue
                work.append((s, rows[pos:pos + n], pos, True, sampling))
                names.append(name)
                if step == 13 and name % 2 and n == 1 and pos + 2 <= rows.shape[0]:  # the next row queued
                    # before this one is answered: it reaches the static step once this one settles
                    work.append((s, rows[pos + 1:pos + 2], pos + 1, True, sampling))
                    names.append(name)
            outs = h.step(work)
            for name, (_s, x, first, _, sampling), out in zip(names, work, outs):
                assert isinstance(out, SegmentDone), out
                (token, logprob), _, logits = live[name][1].step(x, first, sampling)
                assert out.token.token_id == token, (name, step)
                assert abs(out.token.logprob - logprob) < ATOL
                torch.testing.assert_close(out.token.logits, logits, atol=ATOL, rtol=0)
                live[name][3] = first + x.shape[0]
                checked += 1
        assert checked > 150
        assert h.engine.scheduler.steady_ticks >= 15, "the steady plan was never reused"
        assert h.engine.scheduler.mixed_ticks >= 5, "no decode rows took the static step beside prompts"
        assert h.engine.runner.mixed.steps >= 5, "no prompt rode the mixed pass with the decode rows"
        assert h.engine.runner.mixed.continued >= 5, "no chunk continuing a session rode the mixed pass"
        if DEVICE.type == "cpu":  # (rows on a GPU are not staged in the PromptRing)
            assert h.engine.scheduler.prompts.in_place >= 5, "no mixed pass read its prompt rows where they were staged"
        close_checking_kv(h, model, [(s, alone) for s, alone, *_ in live.values()], static_decode)
        assert h.engine.scheduler.prompts.held == 0, "a prompt's rows were never given back to the ring"
    finally:
        h.close()


@pytest.mark.parametrize("static_decode,overlap", [("auto", "off"), ("eager", "off"), ("auto", "on")])
def test_more_decode_sessions_than_the_row_budget_take_turns_on_the_static_step(model, static_decode, overlap):
    """Ten sessions decode under a budget of 4 rows a tick, one of them sending 2 rows now and then (as after a
    token that exited on the edge), and an eleventh joins with a 2-row prompt. Each round of Appends is served in 3
    ticks, the plain decode rows taking turns on the static step in round-robin order (alone, or beside the other
    rows in a mixed pass; they fell to the general path before whenever more sessions were ready than the budget has
    rows), while the other rows get at least half of each tick: the newcomer's prompt is computed in one tick (one
    row a turn before). Every token, log-probability and logit equals serving that session alone."""
    cfg = model.config
    h = Harness(model, blocks=800, block_size=4, rows_per_tick=4, static_decode=static_decode, overlap=overlap)
    graphs = h.engine.runner.graphs
    try:
        prompts = list(range(3, 13)) + [2]
        sessions = [h.manager.open(128, "fp32", False, False, {}) for _ in prompts]
        alone = [Alone(model, cfg.split_layer, ExitPolicy()) for _ in prompts]
        data = [hidden_rows(model, n + 20, seed=40 + i) for i, n in enumerate(prompts)]
        pos = [0] * len(prompts)
        first = h.step([(s, d[:n], 0, True, GREEDY) for s, d, n in zip(sessions[:10], data, prompts)])
        for i, out in enumerate(first):
            assert out.token.token_id == alone[i].step(data[i][:prompts[i]], 0)[0][0]
            pos[i] = prompts[i]
        batched = graphs.replays + h.engine.scheduler.mixed_ticks  # ticks whose decode rows took the static step
        for step in range(6):
            # the newcomer's prompt comes in round 2, queued first (so a tick with more sessions than rows has it)
            order = [10, *range(10)] if step >= 2 else list(range(10))
            work = [(sessions[i], data[i][pos[i]:pos[i] + (prompts[i] if pos[i] == 0 else 2 if i == 0 and step % 2
                                                            else 1)], pos[i], True, GREEDY) for i in order]
            outs = h.step(work)
            spans = [out.ticks for out in outs]  # (first, last) tick that computed each Append's rows
            assert max(b for _, b in spans) - min(a for a, _ in spans) <= 2, f"a round took more than 3 ticks: {spans}"
            if step == 2:
                assert spans[0][0] == spans[0][1], "the newcomer's prompt was not computed in one tick"
            for i, (_s, x, at, _, _), out in zip(order, work, outs):
                (token, logprob), _, logits = alone[i].step(x, at)
                assert out.token.token_id == token, (i, step)
                assert abs(out.token.logprob - logprob) < ATOL
                torch.testing.assert_close(out.token.logits, logits, atol=ATOL, rtol=0)
                pos[i] = at + x.shape[0]
        # every tick (alone, or beside the others' rows in a mixed pass); before, only a round's last (2 sessions)
        assert graphs.replays + h.engine.scheduler.mixed_ticks - batched == 6 * 3, "decode rows took the general path"
        # the operator sees it: each round's first two ticks had more sessions ready than rows
        over = h.engine.metrics.registry.get_sample_value("coexit_ticks_over_budget_total")
        assert over == h.engine.scheduler.over_budget_ticks >= 6 * 2, over
        close_checking_kv(h, model, zip(sessions, alone), static_decode)
    finally:
        h.close()


@pytest.mark.parametrize("static_decode", ["auto", "eager"])
def test_a_prompt_joining_decode_sessions_just_under_the_row_budget_gets_half_the_rows(model, static_decode):
    """Seven sessions decode under a budget of 8 rows a tick (all fit) when an eighth joins with a 4-row prompt,
    queued with their next rows. The prompt gets half the tick's rows, so it is computed in one tick (before, it
    got the one row the decode rows left, and took four), and the decode rows take turns in the rest: each round
    is served within two ticks. Every token, log-probability and logit equals serving that session alone, and the
    blocks come back."""
    cfg = model.config
    h = Harness(model, blocks=800, block_size=4, rows_per_tick=8, static_decode=static_decode)
    try:
        sessions = [h.manager.open(128, "fp32", False, False, {}) for _ in range(8)]
        alone = [Alone(model, cfg.split_layer, ExitPolicy()) for _ in sessions]
        data = [hidden_rows(model, 12, seed=700 + i) for i in range(8)]
        pos = [0] * 8
        for step in range(4):  # a round of the 7 (their prompts first); the newcomer's prompt joins round 2
            order = [7, *range(7)] if step == 2 else list(range(7))
            work = [(sessions[i], data[i][pos[i]:pos[i] + (4 if pos[i] == 0 else 1)], pos[i], True, GREEDY)
                    for i in order]
            outs = h.step(work)
            spans = [out.ticks for out in outs]
            if step == 2:
                assert spans[0][0] == spans[0][1], f"the newcomer's prompt took ticks {spans[0]}"
            if step >= 1:
                assert max(b for _, b in spans) - min(a for a, _ in spans) <= 1, f"a round took 3 ticks: {spans}"
            for i, (_s, x, at, _, _), out in zip(order, work, outs):
                (token, logprob), _, logits = alone[i].step(x, at)
                assert out.token.token_id == token and abs(out.token.logprob - logprob) < ATOL, (i, step)
                torch.testing.assert_close(out.token.logits, logits, atol=ATOL, rtol=0)
                pos[i] = at + x.shape[0]
        # the operator sees it: the joining tick left 3 of the 7 decode rows for the next (8 rows, 4 to the prompt)
        deferred = h.engine.metrics.registry.get_sample_value("coexit_decode_rows_deferred_total")
        assert deferred == h.engine.scheduler.deferred_decode_rows == 3, deferred
        close_checking_kv(h, model, zip(sessions, alone), static_decode)
    finally:
        h.close()


def test_a_burst_of_new_sessions_past_the_row_budget_is_answered_first_come_first_served(model):
    """Twelve new sessions queue 5-row prompts at once under a budget of 8 rows a tick (as clients reconnecting to
    a replica replay their history), then a session under way queues 3 rows that exited on the edge. The burst is
    served first come, first served with 7 rows a tick and one row in turn to the others. The session under way
    goes first, in full (the first tick); the first prompt is answered in the second tick and the rest in the
    order queued, about one a tick, where one row each in turn had every prompt answered in the burst's last
    ticks. Every token, log-probability and logit equals serving that session alone, and the blocks come back."""
    cfg = model.config
    h = Harness(model, blocks=400, block_size=4, rows_per_tick=8, static_decode="eager")
    try:
        sessions = [h.manager.open(128, "fp32", False, False, {}) for _ in range(13)]
        alone = [Alone(model, cfg.split_layer, ExitPolicy()) for _ in sessions]
        data = [hidden_rows(model, 12, seed=500 + i) for i in range(13)]
        (out,) = h.step([(sessions[12], data[12][:4], 0, True, GREEDY)])
        assert out.token.token_id == alone[12].step(data[12][:4], 0)[0][0]
        with h.engine.lock:  # in one go, so the first tick sees them all
            waits = [h.submit(s, d[:5], 0) for s, d in zip(sessions[:12], data)]
            waits.append(h.submit(sessions[12], data[12][4:7], 4))
        outs = []
        for box, ev in waits:
            assert ev.wait(30)
            outs.append(box["out"])
        for i, (x, first) in enumerate([(d[:5], 0) for d in data[:12]] + [(data[12][4:7], 4)]):
            assert isinstance(outs[i], SegmentDone), outs[i]
            (token, logprob), _, logits = alone[i].step(x, first)
            assert outs[i].token.token_id == token and abs(outs[i].token.logprob - logprob) < ATOL
            torch.testing.assert_close(outs[i].token.logits, logits, atol=ATOL, rtol=0)
        start = min(out.ticks[0] for out in outs)
        answered = [out.ticks[1] - start for out in outs]
        assert answered[12] == 0, f"the session under way waited behind the burst: {answered}"
        assert answered[0] <= 1, f"the first prompt was not answered in the burst's first two ticks: {answered}"
        assert answered[:12] == sorted(answered[:12]), f"the prompts were not answered in the order queued: {answered}"
        assert answered[5] <= 4 < answered[11], answered  # about one a tick (one row each: all at ticks 6-8)
        close_checking_kv(h, model, zip(sessions, alone), "eager")
    finally:
        h.close()


def test_prompts_past_the_row_budget_are_served_in_arrival_order_and_read_in_place(model):
    """Prompts that together want more rows than a tick has are served first come, first served while the
    decode sessions get their row every tick: a tick cuts at most its last prompt, whose rest goes first in the
    next tick, so each tick's chunks lie one after the other in the PromptRing and the mixed pass reads them in
    place. Rows of a session under way (tokens that exited on the edge, caught up with the next row) queued after
    the prompts go first, in full, and are the only rows copied. Every token, log-probability and logit equals
    serving that session alone."""
    cfg = model.config
    h = Harness(model, blocks=1000, block_size=4, rows_per_tick=32, static_decode="eager")
    try:
        def check(out, alone, x, first):
            assert isinstance(out, SegmentDone), out
            (token, logprob), _, logits = alone.step(x, first)
            assert out.token.token_id == token and abs(out.token.logprob - logprob) < ATOL
            torch.testing.assert_close(out.token.logits, logits, atol=ATOL, rtol=0)

        def opened(n):
            return [(h.manager.open(128, "fp32", False, False, {}), Alone(model, cfg.split_layer, ExitPolicy()))
                    for _ in range(n)]

        decoding, prompting, (catching,) = opened(4), opened(3), opened(1)
        rows = [hidden_rows(model, 30, seed=200 + i) for i in range(5)]
        prompts = [hidden_rows(model, n, seed=300 + i) for i, n in enumerate((20, 22, 18))]
        for (_, alone), x, out in zip([*decoding, catching], rows, h.step([(s, x[:6], 0, True, GREEDY) for (s, _), x
                                                                          in zip([*decoding, catching], rows)])):
            check(out, alone, x[:6], 0)
        with h.engine.lock:  # the three prompts (60 rows), a catch-up of 6 rows and the decode rows land in one
            # tick of 32 rows (each of the 8 sessions' share: 4 rows)
            waits = [h.submit(s, x, 0) for (s, _), x in zip(prompting, prompts)]
            caught = h.submit(catching[0], rows[4][6:12], 6)
            steps = [h.submit(s, x[6:7], 6) for (s, _), x in zip(decoding, rows)]
        pos = 7
        while steps:
            for (_, alone), x, (box, ev) in zip(decoding, rows, steps):
                assert ev.wait(30)
                check(box["out"], alone, x[pos - 1:pos], pos - 1)
            done = all(ev.is_set() for _, ev in waits)
            steps = [] if done else h.step_async([(s, x[pos:pos + 1], pos) for (s, _), x in zip(decoding, rows)])
            pos += 1
        outs = []
        for (_, alone), x, (box, ev) in zip(prompting, prompts, waits):
            assert ev.wait(30)
            check(box["out"], alone, x, 0)
            outs.append(box["out"])
        (a0, a1), (b0, b1), (c0, c1) = (out.ticks for out in outs)
        assert a0 == a1 == b0 < b1 <= c1, "the first prompt was not served whole, or the second not next"
        assert caught[1].wait(30)
        check(caught[0]["out"], catching[1], rows[4][6:12], 6)
        assert caught[0]["out"].ticks == (a0, a0), "the session under way waited behind the new prompts"
        ring = h.engine.scheduler.prompts
        assert h.engine.runner.mixed.steps >= 3 and ring.in_place == h.engine.runner.mixed.steps
        assert ring.copied == 6, "chunks other than the catch-up were copied beside the run read in place"
    finally:
        h.close()


def test_a_session_closed_while_its_tick_computes_keeps_its_blocks_until_the_tick_settles(model):
    """Sessions closed while their rows compute (one on a steady tick that reused the plan, one on a tick whose
    decode batch rides beside a prompt, one whose prompt chunk rides): each is in flight, its blocks stay held
    until its tick settles and then all come back, its Append is answered NOT_FOUND, and every other session's
    tokens equal serving it alone."""
    cfg = model.config
    h = Harness(model, blocks=2000, block_size=4, static_decode="eager")
    run_tick, closing, seen = h.engine.runner.run_tick, [], []

    def closes_mid_tick(*args):  # the engine thread, outside the lock: as a close from the gRPC side would be
        for s in closing:
            assert h.engine.scheduler.in_flight(s)
            free, held = h.pool.num_free, h.engine.scheduler.prompts.held
            h.manager.close(s)
            assert h.pool.num_free == free, "a closed session's blocks were freed while its tick computed"
            assert h.engine.scheduler.prompts.held == held, "a closed session's prompt rows were given back to " \
                                                            "the ring while its tick read them"
            seen.append(s.id)
        closing.clear()
        return run_tick(*args)

    h.engine.runner.run_tick = closes_mid_tick
    try:
        live = {i: [h.manager.open(128, "fp32", False, False, {}), Alone(model, cfg.split_layer, ExitPolicy()),
                    hidden_rows(model, 30, seed=40 + i), 0] for i in range(5)}
        for step in range(8):
            if step == 5:  # a prompt rides this tick beside the decode rows
                live[5] = [h.manager.open(128, "fp32", False, False, {}), Alone(model, cfg.split_layer, ExitPolicy()),
                           hidden_rows(model, 30, seed=45), 0]
            gone = {3: [0], 5: [1, 5], 6: []}.get(step, [])  # step 3: the steady plan; 5: the new one's prompt
            closing += [live[i][0] for i in gone]
            before = h.pool.num_free
            names = list(live)
            work = [(live[i][0], live[i][2][live[i][3]:live[i][3] + (6 if live[i][3] == 0 else 1)], live[i][3], True,
                     GREEDY) for i in names]
            steady = h.engine.scheduler.steady_ticks
            outs = h.step(work)
            if step == 3:
                assert h.engine.scheduler.steady_ticks == steady + 1, "the close did not land on a steady tick"
            for i, (_s, x, first, _, _), out in zip(names, work, outs):
                if i in gone:
                    assert isinstance(out, ServiceError) and out.code == grpc.StatusCode.NOT_FOUND, out
                    del live[i]
                    continue
                (token, logprob), _, _ = live[i][1].step(x, first)
                assert out.token.token_id == token and abs(out.token.logprob - logprob) < ATOL, (i, step)
                live[i][3] = first + x.shape[0]
            if gone:
                assert h.pool.num_free > before - 8, "the closed sessions' blocks did not come back after the tick"
        assert len(seen) == 3 and not h.engine.scheduler.flying
        for s, *_ in live.values():
            h.manager.close(s)
        assert h.pool.num_free == h.pool.num_blocks - 1  # eager: the scratch block
        assert h.engine.scheduler.prompts.held == 0
    finally:
        h.close()


def test_serving_leaves_no_cyclic_garbage(model):
    """Sessions opened, served (prompts, steady decode, a mixed tick) and closed are freed by reference counting:
    no object of ours waits for Python's cyclic GC, whose collections stop the engine thread mid-tick
    (cloud/engine/heap.py)."""
    h = Harness(model, blocks=2000, block_size=4, static_decode="eager")
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        live = [h.manager.open(128, "fp32", False, False, {}) for _ in range(4)]
        pos = [0] * len(live)
        for step in range(6):
            if step == 3:  # one closes, another opens with a prompt beside the decode rows
                h.manager.close(live.pop(0))
                pos.pop(0)
                live.append(h.manager.open(128, "fp32", False, False, {}))
                pos.append(0)
            work = [(s, hidden_rows(model, 30, seed=i)[p:p + (5 if p == 0 else 1)], p, True, GREEDY)
                    for i, (s, p) in enumerate(zip(live, pos))]
            h.step(work)
            pos = [p + w[1].shape[0] for p, w in zip(pos, work)]
        for s in live:
            h.manager.close(s)
        del live, work, s
        gc.collect()
        ours = [type(o).__module__ + "." + type(o).__qualname__ for o in gc.garbage
                if type(o).__module__.split(".")[0] in ("cloud", "coexit")]
        assert not ours, f"left for the cyclic GC: {sorted(set(ours))}"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        h.close()


def test_overlapped_ticks_with_a_slow_device_equal_sessions_alone(model):
    """Overlap (the device lane): with a delay injected into every decode step's device half, two cohorts of
    sessions, each client waiting for its own answers, keep the lane busy while the engine prepares and launches the
    other cohort's tick. Tokens, log-probabilities and logits equal each session served alone; a session closed
    between its ticks, and a rollback queued while its session's row is on the lane, do not disturb the rest; the
    blocks all come back."""
    cfg = model.config
    h = Harness(model, blocks=2000, block_size=4, static_decode="auto", overlap="on")
    h.engine.batch_wait = 0  # no coalescing: the cohorts stay apart
    compute = h.engine.runner.compute_steady

    def slow(launch, rows):
        time.sleep(0.01)
        return compute(launch, rows)

    h.engine.runner.compute_steady = slow
    try:
        cohorts = []
        for c in range(2):
            cohorts.append([dict(name=10 * c + i, s=h.manager.open(128, "fp32", False, False, {}),
                                 rows=hidden_rows(model, 40, seed=10 * c + i), pos=0, prompt=5 + i, got=[],
                                 sampling=SamplingParams(temperature=0.8, top_k=30, seed=c) if i == 2 else GREEDY)
                            for i in range(3)])
        everyone, errors = cohorts[0] + cohorts[1], []

        def drive(cohort, steps, close_at=None, rollback_at=None, think=0.0):
            try:
                for step in range(steps):
                    time.sleep(think)  # this cohort's clients answer a little later: the cohorts drift apart
                    if step == close_at:  # closed between its ticks: the other sessions go on
                        h.manager.close(cohort.pop()["s"])
                    work = [(e["s"], e["rows"][e["pos"]:e["pos"] + (e["prompt"] if e["pos"] == 0 else 1)], e["pos"],
                             True, e["sampling"]) for e in cohort]
                    if step == rollback_at:  # the first session's row, and a rollback of it queued right behind
                        e, rolled = cohort[0], threading.Event()
                        with h.engine.lock:
                            box, ev = h.submit(*work[0])
                            h.manager.rollback(e["s"], e["pos"], lambda out, done=rolled: done.set())
                        assert ev.wait(30) and rolled.wait(30)
                        e["got"].append((e["pos"], 1, box["out"], True))
                        work, entries = work[1:], cohort[1:]
                    else:
                        entries = cohort
                    for e, w, out in zip(entries, work, h.step(work)):
                        e["got"].append((w[2], w[1].shape[0], out, False))
                        e["pos"] += w[1].shape[0]
            except Exception as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=drive, args=(cohorts[0], 14, 6)),
                   threading.Thread(target=drive, args=(cohorts[1], 14, None, 8, 0.003))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert h.engine.overlapped_ticks > 0, "no tick was launched while another was on the lane"
        checked = 0
        for e in everyone:
            alone = Alone(model, cfg.split_layer, ExitPolicy())
            for first, n, out, rolled_back in e["got"]:
                assert isinstance(out, SegmentDone), out
                (token, logprob), _, logits = alone.step(e["rows"][first:first + n], first, e["sampling"])
                assert out.token.token_id == token, (e["name"], first)
                assert abs(out.token.logprob - logprob) < ATOL
                torch.testing.assert_close(out.token.logits, logits, atol=ATOL, rtol=0)
                if rolled_back:
                    alone.runner.truncate(first)
                checked += 1
            if e["s"].retired:  # the closed one: its KV went back to the pool
                continue
            assert e["s"].length == e["pos"]
            for layer in range(cfg.split_layer, cfg.num_hidden_layers):
                for got_kv, want in zip(e["s"].cache.get(layer), alone.runner.cache.get(layer)):
                    torch.testing.assert_close(got_kv, want, atol=ATOL, rtol=0)
        assert checked == 14 * 2 + 6 + 14 * 3  # the closed session's 6 steps; the rolled-back row's step
        for e in cohorts[0] + cohorts[1]:
            h.manager.close(e["s"])
        deadline = time.monotonic() + 10
        left = h.pool.num_blocks - scratch_blocks("auto")
        while h.pool.num_free != left and time.monotonic() < deadline:
            time.sleep(0.01)
        assert h.pool.num_free == left
    finally:
        h.close()


def test_a_cohort_is_gathered_until_its_last_session_is_back_or_gone(model):
    """Coalescing: after a tick that served sessions A, B and C, the engine waits for all three before its next
    tick (batch_wait is made long here: 20 s). A's and B's Appends alone start no tick; C's starts one at once, which
    carries all three. A session that detaches, or is closed, while the engine waits for it is not waited for."""
    h = Harness(model, blocks=2000, static_decode="eager")
    try:
        ss = [h.manager.open(128, "fp32", False, False, {}) for _ in range(3)]
        rows = [hidden_rows(model, 8, seed=i) for i in range(3)]
        h.step([(s, r[:4], 0, True, GREEDY) for s, r in zip(ss, rows)])  # one tick serves all three
        for pos, leaves in ((4, None), (5, "detach"), (6, "close")):
            h.engine.batch_wait = 20 / max(h.engine._last_tick_s, 1e-6)
            ticks = h.engine.ticks
            waits = [h.submit(s, r[pos:pos + 1], pos) for s, r in zip(ss[:2], rows[:2])]  # A and B, apart
            time.sleep(0.3)
            assert h.engine.ticks == ticks and not any(ev.is_set() for _, ev in waits), "ticked without C"
            if leaves is None:
                waits.append(h.submit(ss[2], rows[2][pos:pos + 1], pos))
            elif leaves == "detach":
                h.manager.detach(ss[2])
            else:
                h.manager.close(ss[2])
            assert all(ev.wait(5) for _, ev in waits), f"the engine kept waiting for C ({leaves or 'back'})"
            assert h.engine.ticks == ticks + 1  # one tick carried the cohort
            if leaves == "detach":  # back on a new stream, and still one of the last two ticks' cohort
                h.manager.resume(ss[2].id)
    finally:
        h.close()


def test_decode_mask_trims_to_the_longest_row_and_drops_an_all_true_mask(model):
    """KVPool.decode_mask: every key of the blocks where the host does not know the lengths (a captured graph);
    up to the longest row where it does; no mask when every row is that long. The static step on rows of equal
    length (no mask) and of unequal lengths (a trimmed mask) gives the general path's tokens and logits."""
    pool = KVPool(8, 4, 2, 16, torch.float32)
    lengths = torch.tensor([3, 6])
    keys, mask = pool.decode_mask(lengths, 2)
    assert keys == 8 and mask[:, 0, 0].tolist() == [[True] * 3 + [False] * 5, [True] * 6 + [False] * 2]
    keys, mask = pool.decode_mask(lengths, 2, lengths.numpy())
    assert keys == 6 and mask[:, 0, 0].tolist() == [[True] * 3 + [False] * 3, [True] * 6]
    assert pool.decode_mask(torch.tensor([6, 6]), 2, np.array([6, 6])) == (6, None)

    twins = [Harness(model, blocks=200, block_size=8, static_decode=d) for d in ("auto", "off")]
    try:
        data = [hidden_rows(model, 24, seed=60 + i) for i in range(3)]
        for pos in ([7, 7, 7], [7, 12, 4]):  # equal lengths: no mask; unequal: masked, up to the longest
            opened = [[h.manager.open(64, "fp32", False, False, {}) for _ in range(3)] for h in twins]
            for h, ss in zip(twins, opened):
                h.step([(s, d[:p], 0, True, GREEDY) for s, d, p in zip(ss, data, pos)])
            replays = twins[0].engine.runner.graphs.replays
            for step in range(4):
                outs = [h.step([(s, d[p + step:p + step + 1], p + step, True, GREEDY)
                                for s, d, p in zip(ss, data, pos)]) for h, ss in zip(twins, opened)]
                for a, b in zip(*outs):
                    assert a.token.token_id == b.token.token_id
                    torch.testing.assert_close(a.token.logits, b.token.logits, atol=ATOL, rtol=0)
            assert twins[0].engine.runner.graphs.replays == replays + 4  # every decode step took the static step
            for h, ss in zip(twins, opened):
                for s in ss:
                    h.manager.close(s)
    finally:
        for h in twins:
            h.close()


def test_kept_gather_equals_gathering_every_step(model):
    """kept.py: sessions decoding together on the static step keep their gathered K/V and only append their new
    rows. Against a twin engine that gathers at every step, the tokens and logits are equal bit for bit, through a
    prompt joining beside the decode rows, a rollback, a session leaving and tables growing a block; each of those
    makes the next step gather anew, and the steps between them append."""
    twins = [Harness(model, blocks=600, block_size=8, static_decode="auto") for _ in range(2)]
    twins[1].engine.runner.graphs.kept = None  # gathers at every step
    kept = twins[0].engine.runner.graphs.kept
    try:
        data = [hidden_rows(model, 40, seed=30 + i) for i in range(4)]
        opened = [[h.manager.open(128, "fp32", False, False, {}) for _ in range(3)] for h in twins]
        pos = [5, 9, 13]  # tables of 1 to 2 blocks of 8
        outs = [h.step([(s, d[:p], 0, True, GREEDY) for s, d, p in zip(ss, data, pos)])
                for h, ss in zip(twins, opened)]
        steps = []
        for step in range(12):
            if step == 3:  # a fourth session's prompt rides beside the decode rows (the mixed pass writes the pool)
                for h, ss in zip(twins, opened):
                    ss.append(h.manager.open(128, "fp32", False, False, {}))
                pos.append(0)
            if step == 6:  # the first session rolls back a position
                for h, ss in zip(twins, opened):
                    done = threading.Event()
                    h.manager.rollback(ss[0], pos[0] - 1, lambda outcome, done=done: done.set())
                    assert done.wait(30)
                pos[0] -= 1
            if step == 9:  # the second session leaves
                for h, ss in zip(twins, opened):
                    h.manager.close(ss.pop(1))
                data.pop(1), pos.pop(1)
            before = (kept.gathers, kept.appends)
            outs = [h.step([(s, d[p:p + (6 if p == 0 else 1)], p, True, GREEDY) for s, d, p in zip(ss, data, pos)])
                    for h, ss in zip(twins, opened)]
            for a, b in zip(*outs):
                assert a.token.token_id == b.token.token_id
                assert torch.equal(a.token.logits, b.token.logits)
            steps.append("gather" if kept.gathers > before[0] else "append" if kept.appends > before[1] else "mixed")
            pos = [p + (6 if p == 0 else 1) for p in pos]
        # step 0 follows the prompts; 3 is the mixed pass and 4 follows it; 6 follows the rollback, 9 the leaving;
        # at 11 the widest table grows a block (the third session's row at position 24, blocks of 8)
        assert steps == ["gather", "append", "append", "mixed", "gather", "append", "gather", "append", "append",
                         "gather", "append", "gather"]
    finally:
        for h in twins:
            h.close()
