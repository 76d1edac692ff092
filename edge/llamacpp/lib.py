"""Access to llama.cpp's shared libraries through llama-cpp-python's low-level ctypes API.

Owns: importing llama_cpp once, silencing (or forwarding to Python logging) llama.cpp's log output, the backend
initialisation, the hidden-state capture, and the extra-buffer-types probe.

- Capture: a C eval callback (native/capture.c) that copies named graph tensors into numpy buffers, handed the
  public ggml functions it needs (`ggml_get_name`, `ggml_nbytes`, `ggml_nelements`, `ggml_is_contiguous`,
  `ggml_backend_tensor_get`) as pointers.
- Probe: whether llama.cpp's extra CPU buffer types (`llama_model_params.use_extra_bufts`: weights repacked for
  AMX or other fast kernels) can run a given GGUF on this host. Some hosts advertise AMX, yet its tile instructions
  fault, and llama.cpp then kills the whole process with SIGILL. `extra_bufts_ok(path)` decides once, in a child
  process that loads the file with the default params and decodes a small batch and a single token (both matmul
  paths): if the child dies or fails, the file runs without extra buffer types (if even that dies, the llama.cpp
  build does not fit the CPU: `LlamaCppBuildError`). The verdict is cached on disk in $XDG_CACHE_HOME/coexit/
  (default ~/.cache/coexit/), keyed by the CPU (model name and flags), the llama.cpp libraries (path, size, mtime)
  and the file's set of tensor types, and in memory per process. `model_params(path)` and `stock_llama(path, ...)`
  apply it; every place that loads a llama.cpp model goes through one of them. Environment:
  COEXIT_LLAMA_EXTRA_BUFTS=0|1 forces extra buffer types off/on without probing; COEXIT_LLAMA_PROBE_FAULT=1 makes
  the probe child kill itself with SIGILL after loading with extra buffer types (what an AMX host that faults
  does; =2 also without them), to exercise those paths on any host.

Nothing here knows about coexit models.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import logging
import mmap
import os
import pathlib
import platform
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from functools import cache, lru_cache

import numpy as np

from coexit.errors import CoexitError, UsageError

log = logging.getLogger("edge.llamacpp")
_KEEP: list = []
EXTRA_BUFTS_ENV, FAULT_ENV = "COEXIT_LLAMA_EXTRA_BUFTS", "COEXIT_LLAMA_PROBE_FAULT"
REBUILD = 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --force-reinstall --no-binary llama-cpp-python llama-cpp-python'
PROBE_TIMEOUT_S = 120


MAX_WANTED, NAME_LEN = 8, 64  # as in edge/llamacpp/native/capture.c


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
    from edge.llamacpp.native import load

    lib = load("capture.c")
    lib.coexit_capture_size.restype = ctypes.c_int32
    if lib.coexit_capture_size() != ctypes.sizeof(_CaptureState):
        raise RuntimeError(f"native/capture.c's state is {lib.coexit_capture_size()} bytes but its Python "
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


# --- extra buffer types: probe, cache, and the loaders' helpers ----------------------------------------------------


class LlamaCppBuildError(CoexitError):
    """llama.cpp cannot run a model on this host even without extra buffer types."""


_verdicts: dict[pathlib.Path, bool] = {}  # cache file -> verdict, this process
_warned: set[pathlib.Path] = set()
_probe_lock, _defaults_lock = threading.Lock(), threading.Lock()


def extra_bufts_ok(gguf_path: str | os.PathLike) -> bool:
    """Whether llama.cpp may use its extra CPU buffer types (repacked weights, AMX) for this GGUF on this host:
    COEXIT_LLAMA_EXTRA_BUFTS if set, else the cached verdict, else a probe (module docstring)."""
    forced = os.environ.get(EXTRA_BUFTS_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise UsageError(f"{EXTRA_BUFTS_ENV}={forced!r}: use 0 (off), 1 (on), or leave it unset (probe)")
    path = pathlib.Path(gguf_path)
    key = _probe_key(path)
    file = cache_dir() / f"llamacpp-extra-bufts-{key[:32]}.json"
    with _probe_lock:
        if file not in _verdicts:
            entry = _read_entry(file)
            if entry is None:
                entry = _probe(path)
                _write_entry(file, entry)
            _verdicts[file] = bool(entry["extra_bufts"])
            if not _verdicts[file] and file not in _warned:
                _warned.add(file)
                log.warning("llama.cpp runs %s without extra buffer types (no repacked/AMX weights): %s. "
                            "Verdict cached in %s", path.name, entry["why"], file)
    return _verdicts[file]


def model_params(gguf_path: str | os.PathLike):
    """llama_model_default_params() for loading `gguf_path` on the CPU, with use_extra_bufts from extra_bufts_ok."""
    mp = llama().llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = extra_bufts_ok(gguf_path)
    return mp


def stock_llama(gguf_path: str | os.PathLike, **kwargs):
    """llama_cpp.Llama(gguf_path, **kwargs) with use_extra_bufts from extra_bufts_ok. Llama takes no such argument
    (llama-cpp-python 0.3.x swallows unknown keywords without a word) and builds its model params from
    llama_model_default_params() inside its constructor, so those defaults carry the verdict while it runs."""
    import llama_cpp.llama_cpp as low  # the module llama_cpp.Llama takes its defaults from

    lc = llama()
    ok = extra_bufts_ok(gguf_path)
    stock_defaults = low.llama_model_default_params

    def defaults():
        mp = stock_defaults()
        mp.use_extra_bufts = ok
        return mp

    with _defaults_lock:
        low.llama_model_default_params = defaults
        try:
            llm = lc.Llama(str(gguf_path), **kwargs)
        finally:
            low.llama_model_default_params = stock_defaults
    if llm.model_params.use_extra_bufts != ok:
        llm.close()
        raise RuntimeError("this llama-cpp-python does not build Llama's model params from "
                           "llama_model_default_params(); edge.llamacpp.lib.stock_llama needs updating")
    return llm


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "coexit"


def _probe_key(path: pathlib.Path) -> str:
    """sha256 of what the verdict depends on: CPU, llama.cpp libraries, the file's tensor types (and the fault
    switch, so that a forced failure never stands in for a real verdict)."""
    st, fault = path.stat(), os.environ.get(FAULT_ENV, "")
    parts = {"cpu": _cpu_id(), "llama_cpp": _lib_id(), "types": _tensor_types(str(path), st.st_size, st.st_mtime_ns),
             "fault": fault if fault in ("1", "2") else ""}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@cache
def _cpu_id() -> str:
    """Model name and feature flags of the first CPU in /proc/cpuinfo (elsewhere: what platform says)."""
    keep = ("vendor_id", "model name", "flags", "Features", "CPU implementer", "CPU part")
    try:
        first = pathlib.Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    fields = dict(map(str.strip, line.split(":", 1)) for line in first.splitlines() if ":" in line)
    return "; ".join([platform.machine()] + [f"{k}: {fields[k]}" for k in keep if k in fields])


@cache
def _lib_id() -> list:
    """llama-cpp-python's bundled shared libraries: path, size and mtime of each (found without loading them)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise CoexitError("llama-cpp-python is not installed: pip install -e '.[edge]'")
    lib = pathlib.Path(list(spec.submodule_search_locations)[0]) / "lib"
    files = sorted(p for p in lib.glob("*") if p.is_file() and not p.is_symlink()) if lib.is_dir() else []
    return [str(lib)] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # fixed-size value types


@lru_cache(maxsize=64)
def _tensor_types(path: str, size: int, mtime_ns: int) -> list[str]:
    """The GGML types of a GGUF's tensors, read from its header. gguf.GGUFReader would do, but it decodes every
    metadata value (about 0.5 s for a tokenizer of 8k tokens, more than the probe); this skips over them."""
    import gguf

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        version = struct.unpack_from("<I", m, 4)[0]
        if m[:4] != b"GGUF" or version not in (2, 3):  # not a little-endian GGUF v2/v3: the slow, general reader
            return sorted({t.tensor_type.name for t in gguf.GGUFReader(path).tensors})

        def skip(vtype: int, pos: int) -> int:
            if vtype == 8:  # string: u64 length, bytes
                return pos + 8 + struct.unpack_from("<Q", m, pos)[0]
            if vtype == 9:  # array: u32 element type, u64 count, elements
                etype, count = struct.unpack_from("<IQ", m, pos)
                pos += 12
                if etype in _GGUF_SIZES:
                    return pos + count * _GGUF_SIZES[etype]
                for _ in range(count):
                    pos = skip(etype, pos)
                return pos
            return pos + _GGUF_SIZES[vtype]

        n_tensors, n_kv = struct.unpack_from("<QQ", m, 8)
        pos, types = 24, set()
        for _ in range(n_kv):  # key, u32 value type, value
            pos = skip(8, pos)
            pos = skip(struct.unpack_from("<I", m, pos)[0], pos + 4)
        for _ in range(n_tensors):  # name, u32 n_dims, i64 dims[n_dims], u32 type, u64 offset
            pos = skip(8, pos)
            pos += 4 + 8 * struct.unpack_from("<I", m, pos)[0]
            types.add(struct.unpack_from("<I", m, pos)[0])
            pos += 12
    return sorted(gguf.GGMLQuantizationType(t).name for t in types)


def _read_entry(file: pathlib.Path) -> dict | None:
    try:
        entry = json.loads(file.read_text())
        return entry if isinstance(entry.get("extra_bufts"), bool) else None
    except (OSError, ValueError, AttributeError):
        return None


def _write_entry(file: pathlib.Path, entry: dict) -> None:
    """Atomically (a temporary file renamed over it); a cache that cannot be written only costs a probe later."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f, indent=1)
        os.replace(tmp, file)
    except OSError as e:
        log.warning("could not cache the llama.cpp probe's verdict in %s: %s", file, e)


def _probe(path: pathlib.Path) -> dict:
    """Run the file in a child with extra buffer types, and if that fails, without: the cache entry."""
    t0 = time.perf_counter()
    failed = _run_child(path, True)
    if failed is not None:
        again = _run_child(path, False)
        if again is not None and again[0]:
            raise LlamaCppBuildError(
                f"llama.cpp {again[1]} running {path} even without extra buffer types (in a probe subprocess): "
                f"this llama-cpp-python build uses instructions this CPU lacks. Rebuild it on this machine: "
                f"{REBUILD}")
        if again is not None:
            raise LlamaCppBuildError(f"llama.cpp could not run {path} in a probe subprocess: {again[1]}")
    st = path.stat()
    return {"extra_bufts": failed is None,
            "why": "a probe ran with them" if failed is None else f"a probe subprocess with them {failed[1]}",
            "probe_s": round(time.perf_counter() - t0, 3), "file": str(path), "cpu": _cpu_id(),
            "llama_cpp": _lib_id()[0], "types": _tensor_types(str(path), st.st_size, st.st_mtime_ns)}


def _run_child(path: pathlib.Path, extra_bufts: bool) -> tuple[bool, str] | None:
    """None if the child ran the file, else (killed by a signal, what happened)."""
    cmd = [sys.executable, "-c", _PROBE_CHILD, str(path), "1" if extra_bufts else "0"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, f"did not finish in {PROBE_TIMEOUT_S} s"
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return True, f"died of {name}"
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"failed (exit code {proc.returncode}: {last})"
    return None


# The probe child, run as `python -c _PROBE_CHILD GGUF 0|1` (only llama_cpp imported: coexit's package imports
# torch, a second of start-up): load with default params but use_extra_bufts as given, decode a batch of 32 tokens
# (the tiled matmuls, e.g. AMX) and then one token (the vector kernels). A crash is the answer. No core file.
_PROBE_CHILD = """
import contextlib, ctypes, os, signal, sys
with contextlib.suppress(ImportError, ValueError, OSError):
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
import llama_cpp as lc

@lc.llama_log_callback
def errors_only(level, text, _user):
    if level == 4:  # GGML_LOG_LEVEL_ERROR, for the parent's message
        sys.stderr.write(text.decode(errors="replace"))

lc.llama_log_set(errors_only, ctypes.c_void_p())
lc.llama_backend_init()
path, extra_bufts = sys.argv[1], sys.argv[2] == "1"
mp = lc.llama_model_default_params()
mp.n_gpu_layers, mp.use_extra_bufts = 0, extra_bufts
model = lc.llama_model_load_from_file(path.encode(), mp)
if not model:
    sys.exit(f"llama.cpp could not load {path}")
fault = os.environ.get("COEXIT_LLAMA_PROBE_FAULT", "")
if fault == "2" or (fault == "1" and extra_bufts):
    os.kill(os.getpid(), signal.SIGILL)
n = 32
cp = lc.llama_context_default_params()
cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 2 * n, n, n, 1
cp.n_threads = cp.n_threads_batch = min(4, os.cpu_count() or 1)
ctx = lc.llama_init_from_model(model, cp)
if not ctx:
    sys.exit("llama.cpp could not create a context")
n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
batch = lc.llama_batch_init(n, 0, 1)
for first, count in ((0, n), (n, 1)):
    batch.n_tokens = count
    for i in range(count):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = (first + i) % n_vocab, first + i, 1
        batch.seq_id[i][0], batch.logits[i] = 0, int(i == count - 1)
    if lc.llama_decode(ctx, batch) != 0:
        sys.exit(f"llama_decode failed on {count} token(s)")
"""
