"""Slot-indexed session state of the KV pool: every session's block tables and filled lengths, one row per session.

A session's PagedCache takes a stable slot when it is made and gives it back when released. Its block table for
layer l is `blocks[l, slot, :nblocks[l, slot]]` (int32 block ids) and its filled length there `lengths[l, slot]`;
layers are absolute model layer indices. The arrays are preallocated and grow by doubling (slots, width, layers),
so a tick reads the tables of all its sessions with one numpy gather, and a table changes only where a session
gains or loses blocks. Entries past a table's length are stale ids (masked out by the lengths wherever they are
read).
"""

from __future__ import annotations

import numpy as np


class SlotTables:
    def __init__(self, slots: int = 16, width: int = 8, layers: int = 1) -> None:
        self.blocks = np.zeros((layers, slots, width), dtype=np.int32)
        self.nblocks = np.zeros((layers, slots), dtype=np.int32)
        self.lengths = np.zeros((layers, slots), dtype=np.int64)
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out low slots first
        self.used = 0
        self.changed: set[int] = set()  # slots whose tables changed since take_changed()

    def take_changed(self) -> set[int]:
        changed, self.changed = self.changed, set()
        return changed

    @property
    def capacity(self) -> int:
        return self.nblocks.shape[1]

    def acquire(self, layers: int) -> int:
        """A free slot (tables empty, lengths 0), growing the arrays to hold `layers` layers."""
        if layers > self.blocks.shape[0]:
            self._resize(layers=layers)
        if not self._free:
            self._resize(slots=2 * self.capacity)
        slot = self._free.pop()
        self.changed.add(slot)
        self.nblocks[:, slot] = 0
        self.lengths[:, slot] = 0
        self.used += 1
        return slot

    def release(self, slot: int) -> None:
        self.nblocks[:, slot] = 0
        self.lengths[:, slot] = 0
        self._free.append(slot)
        self.used -= 1

    def reserve_slots(self, slots: int) -> None:
        """Room for `slots` sessions now, so that no later acquire resizes the arrays (a resize replaces them,
        and must not race with a tick that writes lengths outside the engine lock)."""
        if slots > self.capacity:
            self._resize(slots=slots)

    def reserve_width(self, width: int) -> None:
        if width > self.blocks.shape[2]:
            self._resize(width=max(width, 2 * self.blocks.shape[2]))

    def _resize(self, layers: int | None = None, slots: int | None = None, width: int | None = None) -> None:
        old_l, old_s, old_w = self.blocks.shape
        nl, ns, nw = layers or old_l, slots or old_s, width or old_w
        blocks = np.zeros((nl, ns, nw), dtype=np.int32)
        blocks[:old_l, :old_s, :old_w] = self.blocks
        nblocks = np.zeros((nl, ns), dtype=np.int32)
        nblocks[:old_l, :old_s] = self.nblocks
        lengths = np.zeros((nl, ns), dtype=np.int64)
        lengths[:old_l, :old_s] = self.lengths
        self.blocks, self.nblocks, self.lengths = blocks, nblocks, lengths
        self._free = list(range(ns - 1, old_s - 1, -1)) + self._free if ns > old_s else self._free


class LengthsView:
    """{layer: filled length} of one slot, the mapping LayerLengths users read and write."""

    __slots__ = ("_tables", "_slot_of", "_layers")

    def __init__(self, tables: SlotTables, slot_of, layers: range) -> None:
        self._tables, self._slot_of, self._layers = tables, slot_of, layers

    def __getitem__(self, layer: int) -> int:
        if layer not in self._layers:
            raise KeyError(layer)
        return int(self._tables.lengths[layer, self._slot_of()])

    def __setitem__(self, layer: int, value: int) -> None:
        if layer not in self._layers:
            raise KeyError(layer)
        self._tables.lengths[layer, self._slot_of()] = value

    def __contains__(self, layer: object) -> bool:
        return layer in self._layers

    def __iter__(self):
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def items(self):
        return [(layer, self[layer]) for layer in self._layers]

    def values(self):
        return [self[layer] for layer in self._layers]
