"""Access to llama.cpp's shared libraries through llama-cpp-python's low-level ctypes API.

Owns: importing llama_cpp once, silencing (or forwarding to Python logging) llama.cpp's log output, the backend
initialisation, and the few ggml functions llama-cpp-python does not bind (`ggml_get_name`,
`ggml_backend_tensor_get`), which the hidden-state capture needs. Nothing here knows about coexit models.
"""

from __future__ import annotations

import ctypes
import logging
import pathlib
from functools import cache

log = logging.getLogger("edge.llamacpp")
_KEEP: list = []


class GGMLTensorHead(ctypes.Structure):
    """The stable leading fields of `struct ggml_tensor` (ggml.h): type, buffer, ne[4], nb[4]."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4)]


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
    """libggml-base from llama-cpp-python's lib folder, with the functions the capture uses bound."""
    llama_cpp = llama()
    lib_dir = pathlib.Path(llama_cpp.__file__).parent / "lib"
    names = sorted(lib_dir.glob("libggml-base.*"), key=lambda p: len(p.name))
    if not names:
        raise RuntimeError(f"libggml-base not found in {lib_dir}; is llama-cpp-python installed from a wheel "
                           f"that bundles its libraries?")
    lib = ctypes.CDLL(str(names[0]))
    lib.ggml_get_name.argtypes, lib.ggml_get_name.restype = [ctypes.c_void_p], ctypes.c_char_p
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    return lib
