"""The plain decode rows' inputs, staged by KV slot as they are queued (the engine's persistent input batch).

When a session's whole queue becomes one plain decode row (scheduler.py `plain`), its hidden row, arrival time,
segment, sampling temperature and waiter's reply key are written here at its KV slot, by whoever queued it (the
submitting thread, under the engine lock) or by the tick that settled the segment before it. A tick then copies
its decode rows out once, by slot (`RowsAt`), straight into the input its step reads, and reads the rest by slot
too, instead of Python passes over its sessions and a cat. A slot's entry stays valid while its session is plain:
a session's rows never ride two ticks at once, and one that queues more is no longer plain.

Rows are kept in float32 on the device the rows arrive on: every hidden dtype a client may send converts to it
exactly, so the step sees the same values as from the rows themselves.
"""

from __future__ import annotations

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

    def put(self, slot: int, segment) -> None:
        """Stage a plain decode segment (one row (1, C)) of the session at `slot`."""
        rows = segment.rows
        if self.rows is None or slot >= self.rows.shape[0]:
            self._grow(slot + 1, rows[0])
        if self._host is not None and rows.dtype in _NUMPY_CASTS:  # the submitting thread keeps the GIL
            self._host[slot] = rows.numpy()[0]
        else:
            self.rows[slot] = rows[0]
        self.submitted[slot] = segment.submitted
        self.segments[slot] = segment
        self.temperature[slot] = segment.sampling.temperature
        self.keys[slot] = getattr(segment.waiter, "key", -1)

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
        """Copy the rows into out (n, C) (a view; converted when it is not float32)."""
        if out.dtype == self.buffer.dtype:
            torch.index_select(self.buffer, 0, self.index, out=out)
        else:
            out.copy_(self.gather())
