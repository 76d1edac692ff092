"""The serving processes' Python heap and the cyclic garbage collector.

A serving process (the engine, a front end, a tensor-parallel rank) loads torch, gRPC, numpy and a model: a few
hundred thousand Python objects that live as long as it does. Python's cyclic GC walks all of them in every
collection of its oldest generation, and such a collection stops the engine thread mid-tick: 110-130 ms on the
2-core CI machine with the benchmark's engine (bench/engine_overhead.py), for every session at once. Once the
process has started, `freeze_startup_heap` moves everything that exists to the GC's permanent generation, so
later collections walk only what serving created since (about 25 ms there).

Serving itself creates little cyclic garbage (objects are freed by reference counting as they go), so the young
generations' collections cost what is alive in them: each decode row's segment, tensor and reply slot. Objects
that hold themselves in a cycle (a cache holding a view that holds the cache's own method) are avoided for that
reason: only a collection frees them, and each one makes the next collection come sooner.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect, then freeze every object that exists now (call once the process has loaded what it serves)."""
    gc.collect()
    gc.freeze()
