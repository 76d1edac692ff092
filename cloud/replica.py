"""Tensor-parallel ranks kept in step: rank 0's session changes and ticks, replayed by every other rank.

Under `coexit serve --tp N` every rank holds its shard of the deep layers (cloud/tp.py), its own KV pool over its
KV heads with the same block ids, and the same SessionManager, scheduler and engine code. Only rank 0 serves gRPC.
Its SessionManager records every change it makes (`SessionManager._do`: a session created, an Append's segment
queued, a Rollback, a close or eviction, a resume, touch or detach), and its engine sends that journal to the
other ranks over the CPU process group at two points of each tick: before scheduling ("tick") and before settling
("settle"). A follower applies each change at the same point of the same tick (`SessionManager.apply`), so its
scheduler makes the same decisions (chunks, catch-up, the static step, evictions), and its forward pass meets rank
0's in the same collectives. A follower also computes the heads and samples, because what the next tick runs
depends on them (cloud exits, draft verdicts), but it answers nobody: its waiters are no-ops.

Why replay the inputs rather than broadcast each tick's plan: every feature of the engine (prompt chunks,
catch-up, cloud exits, drafts, propagated KV, rollbacks) then runs under TP through the one code path that is
already tested, and a tick costs one broadcast of the new rows plus a few small records.

A broadcast that fails means a rank is gone: rank 0 calls `on_lost`, which drains the server (health NOT_SERVING)
and makes it exit non-zero; a follower whose broadcast fails exits non-zero, and torchrun stops the rest. A
broadcast also fails when it waits longer than the group's timeout (`--tp-timeout`) with every rank alive, which is
what an idle follower does: so while no tick runs, rank 0 sends a heartbeat (a "beat", the journal so far) every
quarter of the timeout.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import torch.distributed as dist

log = logging.getLogger("coexit.cloud")
HAD_WAITER = "had-waiter"


def _portable(op: tuple) -> tuple:
    """A journal record as it travels: a Segment's rows on the CPU and its waiter a flag."""
    name, args = op
    out = []
    for a in args:
        if dataclasses.is_dataclass(a) and hasattr(a, "waiter"):
            rows = a.rows.cpu()
            if rows.untyped_storage().nbytes() > rows.nbytes:  # a view (of a message, a buffer): send its rows only
                rows = rows.clone()
            a = dataclasses.replace(a, waiter=HAD_WAITER if a.waiter is not None else None, rows=rows, staged=None)
        out.append(a)
    return name, tuple(out)


def _local(args: tuple, device) -> tuple:
    out = []
    for a in args:
        if dataclasses.is_dataclass(a) and hasattr(a, "waiter"):
            a.rows = a.rows.to(device)
            a.waiter = _ignore if a.waiter == HAD_WAITER else None
        out.append(a)
    return tuple(out)


def _ignore(_outcome) -> None:
    pass


class Leader:
    """Rank 0's side: set as `engine.sync`; sends the journal at each point of a tick."""

    def __init__(self, manager, group, on_lost: Callable[[BaseException], None] | None = None,
                 timeout_s: float = 600.0) -> None:
        self.manager, self.group, self.on_lost = manager, group, on_lost
        manager.journal = []
        self.lost: BaseException | None = None
        self.sent = 0  # broadcasts
        manager.engine.sync = self
        manager.engine.lockstep()
        manager.engine.heartbeat(timeout_s / 4)  # an idle engine beats this often: the followers' waits stay short

    def __call__(self, phase: str) -> None:
        if self.lost is not None:
            if phase in ("stop", "beat"):  # (the server is already stopping: on_lost)
                return
            raise RuntimeError("a tensor-parallel rank is gone") from self.lost
        journal = self.manager.journal
        msg = [(phase, [_portable(op) for op in journal])]
        journal.clear()
        try:
            dist.broadcast_object_list(msg, src=0, group=self.group)
        except Exception as exc:  # a rank died: nothing can be computed any more
            self.lost = exc
            log.error("tensor-parallel rank lost (%s): stopping the server", exc)
            if self.on_lost is not None:
                self.on_lost(exc)
            if phase in ("stop", "beat"):  # no tick to fail: the engine thread stays up while the server drains
                return
            raise
        self.sent += 1


def follow(manager, group, device) -> None:
    """A rank > 0: replay rank 0's ticks until it stops. Raises when rank 0 is gone."""
    engine = manager.engine
    engine.lockstep()
    tick = None
    while True:
        msg = [None]
        dist.broadcast_object_list(msg, src=0, group=group)
        phase, ops = msg[0]
        with engine.lock:
            for name, args in ops:
                manager.apply(name, *_local(args, device))
        if phase == "tick":
            tick = engine._schedule()
            tick.started = time.perf_counter()
            engine._compute(tick)  # (a rank lost mid-tick fails it here; the next broadcast raises)
        elif phase == "settle":
            engine._finish(tick, _discard)
            tick = None
        elif phase == "stop":
            return
        # "beat": rank 0 was idle; its journal (sessions opened, closed or detached meanwhile) is applied above


def _discard(_decoded, _finished) -> None:
    pass

