"""The engine's reply fan-out to front-end processes (cloud/ipc.py PackedReplies): a tick's decode rows and its
other plain-token answers reach each front end in one packed message, in order, with the right fields; other
answers go alone, pickled. In one process (Engine.deliver), a tick's answers reach each event loop at once."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import grpc
import numpy as np
import torch
import zmq

from cloud.engine.engine import SegmentDone, StepReplies
from cloud.engine.runner import SteadyOutput, TokenResult
from cloud.engine.scheduler import Segment
from cloud.engine.staging import StagedRows
from cloud.errors import ServiceError
from cloud.ipc import PACKED, PackedReplies, unpack_replies


def flushed(tick) -> list[list[bytes]]:
    """The messages the front ends receive when the engine flushes tick(replies) -> (steady, finished)."""
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind("inproc://replies-test")
    push.connect("inproc://replies-test")
    try:
        replies = PackedReplies(push)
        replies.flush(*tick(replies))
        msgs = []
        while pull.poll(200):
            msgs.append(pull.recv_multipart())
        return msgs
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()


def decode_rows(replies, fronts_or_waiters, first: int, tokens, logprobs, queue_s=None):
    """A tick's StepReplies: one row per front end name (a PackedWaiter for it) or waiter, from position first,
    staged as the scheduler stages decode rows (their waiters' keys read back by slot)."""
    waiters = [replies.waiter(w, first * 10 + i) if isinstance(w, bytes) else w
               for i, w in enumerate(fronts_or_waiters)]
    n = len(waiters)
    sessions = [SimpleNamespace(retired=False, runner=SimpleNamespace(stop=8)) for _ in waiters]
    segments = [Segment(first + i, torch.zeros(1, 4), True, waiter=w) for i, w in enumerate(waiters)]
    staged = StagedRows()
    for slot, seg in zip(range(n - 1, -1, -1), segments):  # row i at slot n - 1 - i
        staged.put(slot, seg)
    rows = staged.at(np.arange(n - 1, -1, -1))
    out = SteadyOutput(tokens, logprobs, torch.arange(9.0 * n).view(n, 9), np.arange(first + 1, first + n + 1))
    return StepReplies(sessions, rows.segments, rows.keys, out, np.array(queue_s or [0.0] * n), 0.05, 3, 4)


def test_a_tick_reaches_each_front_end_as_one_packed_message_in_order():
    def tick(replies):
        steady = decode_rows(replies, [b"a", b"b", b"a", b"b"], 10, [5, 6, 7, 8], [-0.1, -0.2, -0.3, -0.4],
                             [0.001, 0.002, 0.003, 0.004])
        prompt = replies.waiter(b"b", 200, SimpleNamespace(length=40))  # a prompt chunk's token, same tick
        failed = replies.waiter(b"a", 201)
        return steady, [(prompt, SegmentDone(TokenResult(77, -0.5, 8, torch.zeros(9)), 160, 0.05, (2, 3), [], 0,
                                             0.01)),
                        (failed, ServiceError(grpc.StatusCode.NOT_FOUND, "no such session")),
                        (None, SegmentDone(None, 0, 0.0, (3, 3)))]

    msgs = flushed(tick)
    packed = {m[0]: unpack_replies(m[2]) for m in msgs if len(m) == 3 and m[1] == PACKED}
    alone = [pickle.loads(m[1]) for m in msgs if len(m) == 2]
    assert len(msgs) == 3 and sorted(packed) == [b"a", b"b"]  # one packed message per front end
    got = {f: [(rid, o.token_id, round(o.logprob, 6), o.length, o.layer_tokens, o.exit_layer) for rid, o in rows]
           for f, rows in packed.items()}
    assert got[b"a"] == [(100, 5, -0.1, 11, 4, 8), (102, 7, -0.3, 13, 4, 8)]
    assert got[b"b"] == [(101, 6, -0.2, 12, 4, 8), (103, 8, -0.4, 14, 4, 8), (200, 77, -0.5, 40, 160, 8)]
    assert [o.queue_s for _, o in packed[b"b"]] == [0.002, 0.004, 0.01]
    assert alone == [(201, False, ("NOT_FOUND", "no such session"))]


def test_rows_whose_waiter_is_not_packed_are_answered_in_process_and_the_rest_still_packed():
    got_alone = []
    msgs = flushed(lambda replies: (decode_rows(replies, [b"a", got_alone.append, b"b"], 30, [1, 2, 3],
                                                [-1.0, -2.0, -3.0]), []))
    packed = {m[0]: [(rid, o.token_id, o.length) for rid, o in unpack_replies(m[2])] for m in msgs}
    assert packed == {b"a": [(300, 1, 31)], b"b": [(302, 3, 33)]}
    (done,) = got_alone
    assert done.token.token_id == 2 and torch.equal(done.token.logits, torch.arange(9.0, 18.0))


def test_in_one_process_a_ticks_answers_reach_each_event_loop_with_one_wake_up():
    """The in-process fan-out (Engine.deliver): the answers for one event loop's Appends are handed over at once,
    one wake-up of that loop per tick (not one per Append), each future with its own outcome, in order; a plain
    callable waiter is called directly."""
    import asyncio

    from cloud.backend import _LoopReplies
    from cloud.engine.engine import Engine

    loops = [asyncio.new_event_loop(), asyncio.new_event_loop()]
    wakes = []
    try:
        for loop in loops:  # each wake-up runs the loop's flush at once, as a running loop's thread may (a wake is
            # a self-pipe write, during which that thread can take the GIL): the worst case for wake-ups
            loop.call_soon_threadsafe = lambda fn, *a, _loop=loop: (wakes.append(_loop), fn(*a))
        replies = [_LoopReplies(loop) for loop in loops]
        futures = [[loop.create_future() for _ in range(n)] for loop, n in zip(loops, (5, 2))]
        outcomes = [[object() for _ in fs] for fs in futures]
        called = []
        finished = [(r.waiter(f), o) for r, fs, os_ in zip(replies, futures, outcomes) for f, o in zip(fs, os_)]
        finished += [(None, object()), (called.append, "alone")]
        Engine.deliver(None, finished[::2] + finished[1::2])  # the loops' answers interleaved
        assert sorted(map(id, wakes)) == sorted(map(id, loops)), "each loop is woken once"
        assert called == ["alone"]
        for fs, os_ in zip(futures, outcomes):
            assert [f.result() for f in fs] == os_
    finally:
        for loop in loops:
            loop.close()
