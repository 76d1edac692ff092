"""Small native helpers for the llama.cpp edge, compiled from the C sources in this folder on first use.

llama-cpp-python is built from source on install, so a C compiler is present wherever coexit's edge runs. A
library is built once per source (keyed by its sha256 and the compiler) into
`$COEXIT_NATIVE_CACHE` (default `~/.cache/coexit/native`) and loaded with ctypes. The sources use only public
llama.cpp/ggml entry points, passed in as function pointers, never private struct layouts.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

HERE = Path(__file__).parent


def cache_dir() -> Path:
    return Path(os.environ.get("COEXIT_NATIVE_CACHE", Path.home() / ".cache" / "coexit" / "native"))


@cache
def load(source: str) -> ctypes.CDLL:
    """Compile edge/llamacpp/native/<source> (a .c file) into a shared library, once, and load it."""
    src = HERE / source
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError(f"no C compiler found to build {source} (set CC); the llama.cpp edge needs one, as "
                           f"llama-cpp-python's own install does")
    key = hashlib.sha256(src.read_bytes() + compiler.encode()).hexdigest()[:16]
    out = cache_dir() / f"{src.stem}-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [compiler, "-O2", "-shared", "-fPIC", str(src)]
        with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
            pass
        proc = subprocess.run([*cmd, "-o", tmp.name], capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(tmp.name)
            raise RuntimeError(f"building {source} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
        os.replace(tmp.name, out)  # atomic: concurrent first uses cannot load a half-written file
    return ctypes.CDLL(str(out))
