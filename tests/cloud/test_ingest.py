"""The way in from front-end processes (cloud/ipc.py): the plain-token Appends a front end receives in one turn of
its event loop reach the engine process as one message, are queued there in one pass, and each gets its own
answer: the same tokens as the full model, its own error status when refused, and no overtaking by the calls the
front end makes after it."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import grpc
import pytest
import torch

import coexit
from cloud.backend import LocalBackend, OpenArgs
from cloud.errors import ServiceError
from cloud.ipc import RemoteBackend, serve_engine
from cloud.sessions import Limits
from coexit.sampling import GREEDY


@pytest.fixture
def engine(tiny_dir, tmp_path):
    """An engine process's loop (serve_engine over a real LocalBackend) on a thread, at an ipc address."""
    backend = LocalBackend(coexit.load(tiny_dir), Limits(max_sessions=16, kv_budget_bytes=64 << 20))
    address = f"ipc://{tmp_path}/engine.sock"
    loop = asyncio.new_event_loop()

    async def serve():
        with contextlib.suppress(asyncio.CancelledError):
            await serve_engine(backend, address)

    task = loop.create_task(serve())
    thread = threading.Thread(target=loop.run_until_complete, args=(task,), daemon=True)
    thread.start()
    yield address, backend
    loop.call_soon_threadsafe(task.cancel)
    thread.join(10)
    backend.engine.stop()


def test_one_turn_of_appends_is_one_message_with_its_own_answers(tiny_dir, engine):
    engine, _ = engine
    full = coexit.load(tiny_dir)
    split = full.config.split_layer
    prompts = ["def add(a, b):", "for i in range(3):", "import os\n", "x = [1, 2, 3]", "while True:"]
    ids = [torch.tensor([full.tokenizer.encode(p, add_bos=True)]) for p in prompts]
    with torch.no_grad():
        rows = [full.stage(0, split)(x).hidden[0] for x in ids]
        expected = [int(full(x).logits[0, -1].argmax()) for x in ids]

    async def main():
        remote = RemoteBackend(engine)
        await remote.connect()
        try:
            sids = [(await remote.open(OpenArgs())).id for _ in range(len(prompts) + 2)]
            sent = remote.sent_messages, remote.sent_appends

            def append(sid, first, x):
                return remote.append(sid, first, x, True, GREEDY, 0, False, (0, 0))

            calls = [append(sid, 0, x) for sid, x in zip(sids, rows)]
            calls.append(append(sids[-2], 3, rows[0]))  # a gap: refused alone
            calls.append(append("no-such-session", 0, rows[0]))
            calls.append(append(sids[-1], 0, rows[1].half()))  # fp16 rows between fp32 ones
            got = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 120)
            assert (remote.sent_messages - sent[0], remote.sent_appends - sent[1]) == (1, len(calls))
            assert [(o.length, o.has_token, o.token_id) for o in got[:len(prompts)]] == \
                [(x.shape[0], True, t) for x, t in zip(rows, expected)]
            gap, missing, half = got[len(prompts):]
            assert isinstance(gap, ServiceError) and gap.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "gap" in gap.message
            assert isinstance(missing, ServiceError) and missing.code == grpc.StatusCode.NOT_FOUND
            assert half.length == rows[1].shape[0] and half.has_token
            # the refused sessions are untouched: the gap's session still takes its rows from position 0
            again = await append(sids[-2], 0, rows[0])
            assert (again.length, again.token_id) == (rows[0].shape[0], expected[0])
            # an Append queued in this turn reaches the engine before a Close made after it in the same turn
            a = asyncio.ensure_future(append(sids[0], rows[0].shape[0], rows[0][:1]))
            await asyncio.sleep(0)
            await remote.close(sids[0], (0, 0))
            (out,) = await asyncio.gather(a, return_exceptions=True)
            # queued, then dropped by the Close (or computed before it): not refused as if the session were gone
            assert (out.has_token if not isinstance(out, BaseException) else
                    out.code == grpc.StatusCode.NOT_FOUND and "before these rows were computed" in out.message), out
        finally:
            remote.stop()

    asyncio.run(main())


def test_a_turn_of_decode_rows_is_queued_and_staged_in_one_pass_with_each_its_token(tiny_dir, engine):
    """Sessions each send their prompt but its last row, then, in one turn, that row: one message whose decode rows
    the engine stages in one pass (as one view of the message when they are alike, each its own when fp16 and fp32
    rows mix). Each answer is the full model's next token for that session."""
    address, backend = engine
    full = coexit.load(tiny_dir)
    split = full.config.split_layer
    texts = ["def add(a, b):", "for i in range(3):", "import os\n", "x = [1, 2, 3]", "while True:", "class A:",
             "print('hi')", "if x > 0:", "return None", "try:\n    pass"]
    ids = [torch.tensor([full.tokenizer.encode(t, add_bos=True)]) for t in texts]
    with torch.no_grad():
        rows = [full.stage(0, split)(x).hidden[0] for x in ids]
        expected = [int(full(x).logits[0, -1].argmax()) for x in ids]
    staged = backend.engine.scheduler.staged

    async def main():
        remote = RemoteBackend(address)
        await remote.connect()
        try:
            sids = [(await remote.open(OpenArgs())).id for _ in texts]

            def append(sid, first, x):
                return remote.append(sid, first, x, True, GREEDY, 0, False, (0, 0))

            await asyncio.wait_for(asyncio.gather(*[append(sid, 0, x[:-1]) for sid, x in zip(sids, rows)]), 120)
            for group, half in ((range(0, 5), False), (range(5, 10), True)):  # alike; then fp16 among fp32
                before, sent = staged.batches, remote.sent_messages
                last = [rows[i][-1:].half() if half and i % 2 else rows[i][-1:] for i in group]
                got = await asyncio.wait_for(asyncio.gather(*[append(sids[i], rows[i].shape[0] - 1, x)
                                                              for i, x in zip(group, last)]), 120)
                assert remote.sent_messages - sent == 1
                assert staged.batches == before + 1, "the decode rows were not staged in one pass"
                assert [(o.length, o.token_id) for o in got] == [(rows[i].shape[0], expected[i]) for i in group]
        finally:
            remote.stop()

    asyncio.run(main())


def test_a_fault_while_queueing_a_message_answers_each_of_its_appends_and_the_server_goes_on(tiny_dir, engine):
    """A server fault inside the engine's queueing of a message (injected: the scheduler raises once) answers every
    Append of that message with it (INTERNAL at the front end), none waits for a token that will not come, and the
    next message is served as before."""
    address, backend = engine
    full = coexit.load(tiny_dir)
    ids = torch.tensor([full.tokenizer.encode("def add(a, b):", add_bos=True)])
    with torch.no_grad():
        rows = full.stage(0, full.config.split_layer)(ids).hidden[0]
        expected = int(full(ids).logits[0, -1].argmax())
    scheduler = backend.engine.scheduler
    real = scheduler.submit_many
    faults = []

    def faulty(items):
        if not faults:
            faults.append(len(items))
            raise RuntimeError("injected fault")
        return real(items)

    async def main():
        remote = RemoteBackend(address)
        await remote.connect()
        try:
            sids = [(await remote.open(OpenArgs())).id for _ in range(3)]

            def append(sid, first, x):
                return remote.append(sid, first, x, True, GREEDY, 0, False, (0, 0))

            scheduler.submit_many = faulty
            got = await asyncio.wait_for(asyncio.gather(*[append(sid, 0, rows) for sid in sids],
                                                        return_exceptions=True), 60)
            assert faults == [3]
            # a server fault reaches the front end as one (its servicer answers INTERNAL), each its own
            assert all(type(g) is RuntimeError and "injected fault" in str(g) for g in got), got
            fresh = (await remote.open(OpenArgs())).id
            out = await asyncio.wait_for(append(fresh, 0, rows), 60)
            assert (out.length, out.token_id) == (rows.shape[0], expected)
        finally:
            scheduler.submit_many = real
            remote.stop()

    asyncio.run(main())
