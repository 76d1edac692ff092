"""The device lane: where an overlapped tick's device work runs, in launch order, while the engine thread prepares
the next tick.

One worker thread takes the prepared steady steps (`BatchedRunner.compute_steady`) one after another, as a CUDA
stream would. On a GPU it launches them on its own stream, which first waits for everything the engine thread
queued on the default stream (the zeroing of newly allocated KV blocks), and its tick's one device-to-host copy
blocks this thread, not the engine's. A tick's results are a Future: the engine settles them after it has
launched the next tick. On a CPU the worker computes the step itself (torch releases the GIL inside its kernels), so
the same ordering runs, and is tested, without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class DeviceLane:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coexit-lane")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def submit(self, fn: Callable, *args) -> Future:
        return self._pool.submit(self._run, fn, args)

    def _run(self, fn: Callable, args: tuple):
        if self._stream is None:
            return fn(*args)
        self._stream.wait_stream(torch.cuda.default_stream(self.device))
        with torch.cuda.stream(self._stream):
            return fn(*args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
