"""Rows staged as they are queued, where a tick reads them: the plain decode rows by KV slot (`StagedRows`, the
engine's persistent input batch) and, on a CPU, the prompt chunks' rows back to back in a ring (`PromptRing`).

When a session's whole queue becomes one plain decode row (scheduler.py `plain`), its hidden row, arrival time,
segment, sampling temperature and waiter's reply key are written here at its KV slot, by whoever queued it (the
submitting thread, under the engine lock) or by the tick that settled the segment before it. A tick then copies
its decode rows out once, by slot (`RowsAt`), straight into the input its step reads, and reads the rest by slot
too, instead of Python passes over its sessions and a cat. A slot's entry stays valid while its session is plain:
a session's rows never ride two ticks at once, and one that queues more is no longer plain.

Rows are kept in float32 on the device the rows arrive on: every hidden dtype a client may send converts to it
exactly, so the step sees the same values as from the rows themselves. A server's decode rows arrive on the host
(LocalBackend.segment leaves them there), so on a GPU a tick's decode rows reach the device in one copy
(`RowsAt.into`), not one per Append.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_NUMPY_CASTS = (torch.float32, torch.float16)  # row dtypes numpy reads and widens to float32 exactly


class StagedRows:
    def __init__(self) -> None:
        self.rows: Tensor | None = None  # (capacity, C) float32
        self._host: np.ndarray | None = None  # a numpy view of rows when they are on the CPU
        self.submitted = np.zeros(0, dtype=np.float64)  # (capacity,) perf_counter at arrival
        self.segments = np.empty(0, dtype=object)  # (capacity,) the staged Segment
        self.temperature = np.zeros(0, dtype=np.float64)  # (capacity,) its sampling temperature (0: greedy)
        self.keys = np.zeros(0, dtype=np.int64)  # (capacity,) its waiter's `key` (a packed reply, cloud.ipc), or -1
        self.batches = 0  # put_many calls that wrote their rows in one pass (tests)

    def put(self, slot: int, segment) -> None:
        """Stage a plain decode segment (one row (1, C)) of the session at `slot`."""
        rows = segment.rows
        if self.rows is None or slot >= self.rows.shape[0]:
            self._grow(slot + 1, rows[0])
        if self._by_numpy(rows):
            self._host[slot] = rows.numpy()[0]
        else:
            self.rows[slot] = rows[0]
        self.submitted[slot] = segment.submitted
        self.segments[slot] = segment
        self.temperature[slot] = segment.sampling.temperature
        self.keys[slot] = getattr(segment.waiter, "key", -1)

    def put_many(self, staged: list[tuple[int, object]]) -> None:
        """`put` for several (slot, segment) pairs at once (a front end's message of decode rows), each array
        written once."""
        if len(staged) < 4:  # (one by one is as fast)
            for slot, segment in staged:
                self.put(slot, segment)
            return
        self.batches += 1
        slots, segments = zip(*staged)
        idx = np.array(slots, dtype=np.int64)
        rows = torch.cat([seg.rows for seg in segments])  # (k, C), float32 when the dtypes differ
        top = max(slots)  # (Python's max: numpy's costs more for a message's few hundred)
        if self.rows is None or top >= self.rows.shape[0]:
            self._grow(top + 1, rows[0])
        if self._by_numpy(rows):
            self._host[idx] = rows.numpy()
        else:
            self.rows[torch.from_numpy(idx).to(self.rows.device)] = rows.to(self.rows)
        self.submitted[idx] = [seg.submitted for seg in segments]
        self.segments[idx] = np.fromiter(segments, dtype=object, count=len(segments))
        self.temperature[idx] = [seg.sampling.temperature for seg in segments]
        self.keys[idx] = [getattr(seg.waiter, "key", -1) for seg in segments]

    def _by_numpy(self, rows: Tensor) -> bool:
        """Whether rows are written through the buffer's numpy view (host rows numpy widens exactly; the submitting
        thread keeps the GIL) rather than by torch."""
        return self._host is not None and rows.dtype in _NUMPY_CASTS and rows.device.type == "cpu"

    def at(self, slots: np.ndarray) -> RowsAt:
        """The staged rows of the sessions at `slots`, in that order, with what was staged beside them (under the
        engine lock: a later put may move the buffer, but not these sessions' rows, which stay staged until they
        settle)."""
        return RowsAt(self.rows, torch.from_numpy(slots).to(self.rows.device), self.segments[slots].tolist(),
                      np.flatnonzero(self.temperature[slots]), self.keys[slots], self.submitted[slots])

    def _grow(self, need: int, row: Tensor) -> None:
        cap = max(need, 2 * len(self.submitted), 64)
        rows = torch.zeros(cap, row.shape[-1], dtype=torch.float32, device=row.device)
        old = len(self.submitted)
        if self.rows is not None:
            rows[:old] = self.rows
        self.rows = rows
        self._host = rows.numpy() if rows.device.type == "cpu" else None
        more = cap - old
        self.submitted = np.concatenate([self.submitted, np.zeros(more)])
        self.segments = np.concatenate([self.segments, np.empty(more, dtype=object)])
        self.temperature = np.concatenate([self.temperature, np.zeros(more)])
        self.keys = np.concatenate([self.keys, np.full(more, -1, dtype=np.int64)])


class RowsAt:
    """A tick's decode rows: rows (n, C) of a staging buffer, copied out once, straight where the step reads them;
    and, row by row, their segments, the rows that draw a sample (temperature > 0; the rest are greedy), their
    waiters' keys and their arrival times."""

    def __init__(self, buffer: Tensor, index: Tensor, segments: list, drawn: np.ndarray, keys: np.ndarray,
                 submitted: np.ndarray) -> None:
        self.buffer, self.index = buffer, index
        self.segments, self.drawn, self.keys, self.submitted = segments, drawn, keys, submitted

    def __len__(self) -> int:
        return self.index.shape[0]

    def sampling(self) -> list:
        """The SamplingParams of the rows in `drawn`."""
        return [self.segments[i].sampling for i in self.drawn.tolist()]

    def gather(self) -> Tensor:
        """The rows (n, C), float32, a new tensor."""
        return self.buffer.index_select(0, self.index)

    def into(self, out: Tensor) -> None:
        """Copy the rows into out (n, C) (a view; converted when it is not float32; from the host in one copy when
        out is on a GPU and the rows were staged on the host, as a server stages them)."""
        if out.dtype == self.buffer.dtype and out.device == self.buffer.device:
            torch.index_select(self.buffer, 0, self.index, out=out)
        else:
            out.copy_(self.gather())


@dataclass
class Placed:
    """A mixed pass's input in the PromptRing: the chunks in the input's order (the ones read in place are the last
    `kept` when `extra_first`, else the first), the input view (T + extra, C), the region taken for the rows
    copied into it (to give back once the pass has read it, or None), and where the extra (decode) rows go: first,
    or after the chunks."""

    order: list[int]
    kept: int
    rows: Tensor
    region: list | None
    extra_first: bool


class PromptRing:
    """Prompt rows staged back to back in one float32 buffer as they are queued, so that a mixed tick (mixed.py)
    reads most of them in place: its input (T + n, C) is a view of the ring over a run of its chunks that lie one
    after the other (a tick's new prompts, in their order: the common case), with its decode rows and its other
    chunks (a prompt cut by the row budget, rows that were not staged) copied beside the run. The run either ends
    at the newest staged row (the copies go into the free rows after it) or starts at the oldest held row (they go
    before it, decode rows first; an empty ring starts again `reserve` rows in, to leave room there). So a
    prompt's rows are copied once, by whoever queued them (the submitting thread, under the engine lock), and not
    again on the engine thread.

    A ring of regions in order: a region is a segment's rows, or the rows a tick copied beside its run; it is given
    back by `release` (a segment popped or dropped, after any tick reading it has landed; a pass that has read its
    input), and space is reused only once every region before it, or after it up to the newest, was given back.
    Rows that do not fit stay where they are; a tick with no run copies its chunks into a new tensor as before
    (`place` says None). CPU rows only: on a GPU the packing is one device copy.
    """

    def __init__(self, capacity: int, max_bytes: int = 64 << 20) -> None:
        self.capacity = capacity  # rows, at most max_bytes of them (set at the first staged rows)
        self.max_bytes = max_bytes
        self.reserve = capacity // 4  # rows left free before the first region taken into an empty ring
        self.rows: Tensor | None = None  # (capacity, C) float32, allocated at the first staged prompt
        self._base = self._end = 0  # the buffer's address range
        self._live: deque = deque()  # regions [start, stop, given back] in the order they were taken
        self.top = 0  # where the next region starts, when it fits
        self._lock = threading.Lock()  # regions are taken by the submitting threads and the engine thread
        self.in_place = 0  # mixed passes that read their chunks here
        self.copied = 0  # chunk rows those passes copied beside their run

    @property
    def held(self) -> int:
        """Regions not given back yet (or held behind one that is not)."""
        return len(self._live)

    def stage(self, rows: Tensor) -> tuple[Tensor, list] | None:
        """Copy rows (k, C) into the ring: (their view, the region to `release`), or None (not staged)."""
        if rows.dtype != torch.float32 or rows.device.type != "cpu" or rows.dim() != 2:
            return None
        if self.rows is None:
            self.capacity = max(1, min(self.capacity, self.max_bytes // (4 * rows.shape[1])))
            self.reserve = self.capacity // 4
            self.rows = torch.empty(self.capacity, rows.shape[1], dtype=torch.float32)
            self._base = self.rows.data_ptr()
            self._end = self._base + self.rows.nbytes
        if rows.shape[1] != self.rows.shape[1]:
            return None
        with self._lock:
            region = self._take(rows.shape[0])
        if region is None:
            return None
        view = self.rows[region[0]:region[1]]
        view.copy_(rows)
        return view, region

    def place(self, xs: list[Tensor], extra: int) -> Placed | None:
        """Where a mixed pass's input can be read in place: the longest run of the chunks xs that lie one after
        the other in the ring, either up to its newest staged row (rows for the other chunks and then `extra`
        more, the decode rows, are taken right after it) or from its oldest held row (the `extra` rows and then
        the other chunks' are taken right before it). None when neither run exists or has room beside it."""
        if self.rows is None:
            return None
        width, base, end = self.rows.stride(0) * self.rows.element_size(), self._base, self._end
        ends, starts = {}, {}  # a ring chunk's end row -> (its first row, its index); first row -> (end, index)
        for i, x in enumerate(xs):
            p = x.data_ptr()
            if base <= p < end and x.dtype == torch.float32 and x.is_contiguous():
                row = (p - base) // width
                ends[row + x.shape[0]] = (row, i)
                starts[row] = (row + x.shape[0], i)
        total = sum(x.shape[0] for x in xs) + extra
        with self._lock:
            if not self._live:
                return None
            top = at = self.top
            after = []  # the run up to the newest row, newest first
            while at in ends:
                at, i = ends[at]
                after.append(i)
            head, stop = self._live[0][0], self._live[0][1]
            # the run from the oldest held row, or from where the oldest region's segment goes on (the rows
            # before it were read in earlier ticks)
            to = head = min((r for r in starts if head <= r < stop), default=head)
            before = []
            while to in starts:
                to, i = starts[to]
                before.append(i)
            if after and top - at >= to - head:
                more = total - (top - at)
                run, first, stop, extra_first = after[::-1], at, top + more, False
                region = self._take(more, top) if more else None
            elif before:
                more = total - (to - head)
                run, first, stop, extra_first = before, head - more, to, True
                region = self._take_before(more, head) if more else None
            else:
                return None
            if more and region is None:
                return None
        kept = set(run)
        rest = [i for i in range(len(xs)) if i not in kept]
        self.in_place += 1
        self.copied += sum(xs[i].shape[0] for i in rest)
        return Placed(rest + run if extra_first else run + rest, len(run), self.rows[first:stop], region,
                      extra_first)

    def release(self, region: list) -> None:
        """Give a region back (each once); space frees up to the oldest region still held."""
        with self._lock:
            region[2] = True
            live = self._live
            while live and live[0][2]:
                live.popleft()
            while live and live[-1][2]:  # the newest given back too: the next region may take their rows
                live.pop()
            if live:
                self.top = live[-1][1]

    def _take_before(self, k: int, at: int) -> list | None:
        """(Under the lock.) A region of k rows ending at row `at` of the oldest held region (its rows before
        `at` were read and are given up), when the rows before it are free."""
        live = self._live
        wrapped = live[-1][0] < live[0][0]
        if k > at or (wrapped and self.top > at - k):
            return None
        live[0][0] = at
        region = [at - k, at, False]
        live.appendleft(region)
        return region

    def _take(self, k: int, at: int | None = None) -> list | None:
        """(Under the lock.) A region of k rows at `top` (or wrapped to row 0) when free, and only at row `at`
        when given; None when there is no room."""
        live, cap = self._live, self.capacity
        if not live:  # all given back: start again after the rows kept free for `place`'s runs from the oldest row
            self.top = self.reserve if at is None else self.top
            start = self.top if self.top + k <= cap else (0 if k <= cap and at is None else None)
        else:
            head = live[0][0]
            if live[-1][0] >= head:  # not wrapped: free rows are [top, cap) and [0, head)
                start = self.top if self.top + k <= cap else (0 if k <= head else None)
            else:  # wrapped: free rows are [top, head)
                start = self.top if self.top + k <= head else None
        if start is None or (at is not None and start != at):
            return None
        region = [start, start + k, False]
        live.append(region)
        self.top = start + k
        return region
