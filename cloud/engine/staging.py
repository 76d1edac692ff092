"""The plain decode rows' inputs, staged by KV slot as they are queued (the engine's persistent input batch).

When a session's whole queue becomes one plain decode row (scheduler.py `plain`), its hidden row and arrival
time are written here at its KV slot, by whoever queued it (the submitting thread, under the engine lock) or by
the tick that settled the segment before it. A tick then copies its decode rows out once, by slot (`RowsAt`),
straight into the input its step reads, instead of a Python pass over its sessions and a cat. A slot's entry stays
valid while its session is plain: a session's rows never ride two ticks at once, and one that queues more is no
longer plain.

Rows are kept in float32 on the device the rows arrive on: every hidden dtype a client may send converts to it
exactly, so the step sees the same values as from the rows themselves.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class StagedRows:
    def __init__(self) -> None:
        self.rows: Tensor | None = None  # (capacity, C) float32
        self.submitted = np.zeros(0, dtype=np.float64)  # (capacity,) perf_counter at arrival

    def put(self, slot: int, segment) -> None:
        """Stage a plain decode segment (one row (1, C)) of the session at `slot`."""
        row = segment.rows[0]
        if self.rows is None or slot >= self.rows.shape[0]:
            self._grow(slot + 1, row)
        self.rows[slot] = row
        self.submitted[slot] = segment.submitted

    def at(self, slots: np.ndarray) -> RowsAt:
        """The staged rows of the sessions at `slots`, in that order, to be copied out later (under the engine
        lock: a later put may move the buffer, but not these sessions' rows, which stay staged until they
        settle)."""
        return RowsAt(self.rows, torch.from_numpy(slots).to(self.rows.device))

    def _grow(self, need: int, row: Tensor) -> None:
        cap = max(need, 2 * len(self.submitted), 64)
        rows = torch.zeros(cap, row.shape[-1], dtype=torch.float32, device=row.device)
        old = len(self.submitted)
        if self.rows is not None:
            rows[:old] = self.rows
        self.rows = rows
        self.submitted = np.concatenate([self.submitted, np.zeros(cap - old)])


class RowsAt:
    """A tick's decode rows: rows (n, C) of a staging buffer, copied out once, straight where the step reads them."""

    def __init__(self, buffer: Tensor, index: Tensor) -> None:
        self.buffer, self.index = buffer, index

    def __len__(self) -> int:
        return self.index.shape[0]

    def gather(self) -> Tensor:
        """The rows (n, C), float32, a new tensor."""
        return self.buffer.index_select(0, self.index)

    def into(self, out: Tensor) -> None:
        """Copy the rows into out (n, C), a float32 view."""
        torch.index_select(self.buffer, 0, self.index, out=out)
