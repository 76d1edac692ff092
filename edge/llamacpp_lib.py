"""Access to llama.cpp's shared libraries through llama-cpp-python's low-level ctypes API.

Owns: importing llama_cpp once, silencing (or forwarding to Python logging) llama.cpp's log output, the backend
initialisation, and the hidden-state capture: a C eval callback (edge/native/capture.c) that copies named graph
tensors into numpy buffers, handed the public ggml functions it needs (`ggml_get_name`, `ggml_nbytes`,
`ggml_nelements`, `ggml_is_contiguous`, `ggml_backend_tensor_get`) as pointers. Nothing here knows about coexit
models.
"""

from __future__ import annotations

import ctypes
import logging
import pathlib
from functools import cache

import numpy as np

log = logging.getLogger("edge.llamacpp")
_KEEP: list = []


MAX_WANTED, NAME_LEN = 8, 64  # as in edge/native/capture.c


class _CaptureState(ctypes.Structure):
    """Mirror of capture.c's coexit_capture (its size is checked against the C side's at load)."""

    _fields_ = [("get_name", ctypes.c_void_p), ("tensor_get", ctypes.c_void_p), ("nbytes", ctypes.c_void_p),
                ("nelements", ctypes.c_void_p), ("is_contiguous", ctypes.c_void_p),
                ("n_wanted", ctypes.c_int32), ("error", ctypes.c_int32),
                ("names", (ctypes.c_char * NAME_LEN) * MAX_WANTED),
                ("buf", ctypes.c_void_p * MAX_WANTED), ("capacity", ctypes.c_int64 * MAX_WANTED),
                ("filled", ctypes.c_int64 * MAX_WANTED)]


class Capture:
    """Graph tensors to copy out during llama_decode: `names` (e.g. b"l_out-3"), each into an f32 buffer of
    `rows` x `width`. Pass `callback` and `user_data` as the context's cb_eval / cb_eval_user_data; after each
    llama_decode call `take(i)` for tensor i's rows, which also resets its buffer."""

    def __init__(self, names: list[bytes], rows: int, width: int) -> None:
        if len(names) > MAX_WANTED:
            raise ValueError(f"at most {MAX_WANTED} captured tensors, got {len(names)}")
        lib, g = _capture_lib(), ggml()
        self.width = width
        self.state = _CaptureState()
        for i, fn in enumerate(("ggml_get_name", "ggml_backend_tensor_get", "ggml_nbytes", "ggml_nelements",
                                "ggml_is_contiguous")):
            setattr(self.state, _CaptureState._fields_[i][0], ctypes.cast(getattr(g, fn), ctypes.c_void_p).value)
        self.buffers = [np.empty(rows * width, np.float32) for _ in names]
        self.state.n_wanted = len(names)
        for i, (name, buf) in enumerate(zip(names, self.buffers)):
            self.state.names[i].value = name
            self.state.buf[i], self.state.capacity[i] = buf.ctypes.data, buf.size
        self.callback = ctypes.cast(lib.coexit_capture_eval, ctypes.c_void_p).value
        self.user_data = ctypes.addressof(self.state)

    def check(self) -> None:
        """Raise if the last llama_decode hit a tensor the capture could not take."""
        err, self.state.error = self.state.error, 0
        if err == 1:
            raise RuntimeError("a captured llama.cpp tensor is not contiguous f32; this llama.cpp build lays out "
                               "its layer outputs differently from what coexit supports")
        if err == 2:
            raise RuntimeError("a captured llama.cpp tensor is larger than its buffer (more rows than n_batch)")

    def take(self, i: int) -> np.ndarray:
        """Rows (n, width) captured for tensor i since the last take (a copy), and reset."""
        n = self.state.filled[i]
        self.state.filled[i] = 0
        if n % self.width:
            raise RuntimeError(f"captured {n} floats, not a whole number of {self.width}-wide rows")
        return self.buffers[i][:n].reshape(-1, self.width).copy()


@cache
def _capture_lib():
    from edge.native import load

    lib = load("capture.c")
    lib.coexit_capture_size.restype = ctypes.c_int32
    if lib.coexit_capture_size() != ctypes.sizeof(_CaptureState):
        raise RuntimeError(f"edge/native/capture.c's state is {lib.coexit_capture_size()} bytes but its Python "
                           f"mirror is {ctypes.sizeof(_CaptureState)}: keep the two in step")
    return lib


@cache
def llama():
    """The llama_cpp module, with the backend initialised and llama.cpp's logging routed to `edge.llamacpp`."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _log(level, text, _user):  # llama.cpp is chatty at load time: keep it at DEBUG
        if text and log.isEnabledFor(logging.DEBUG):
            log.debug("%s", text.decode(errors="replace").rstrip())

    llama_cpp.llama_log_set(_log, ctypes.c_void_p())
    _KEEP.append(_log)  # the ctypes callback must outlive every llama.cpp call
    llama_cpp.llama_backend_init()
    return llama_cpp


@cache
def ggml():
    """libggml-base from llama-cpp-python's lib folder (the capture takes its functions' addresses)."""
    llama_cpp = llama()
    lib_dir = pathlib.Path(llama_cpp.__file__).parent / "lib"
    names = sorted(lib_dir.glob("libggml-base.*"), key=lambda p: len(p.name))
    if not names:
        raise RuntimeError(f"libggml-base not found in {lib_dir}; is llama-cpp-python installed from a wheel "
                           f"that bundles its libraries?")
    lib = ctypes.CDLL(str(names[0]))
    return lib
