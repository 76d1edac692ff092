"""Local multi-process launch of `coexit train` for tests and benchmarks: torchrun on a free loopback port.

`launch(nproc, job_path)` runs `python -m torch.distributed.run --nproc_per_node N --master_port P -m training.cli
--config job.toml` with OMP_NUM_THREADS=1, PYTHONPATH pointing at this checkout and TORCH_EXTENSIONS_DIR cached
under ~/.cache/coexit (DeepSpeed's CPU comm op compiles once, ~30 s, then loads from there).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, job: str | Path, timeout: float = 300, extra_env: dict | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/coexit/torch_extensions"))
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "training.cli",
           "--config", str(job)]
    proc = subprocess.run(cmd, env=env, cwd=str(Path(job).parent), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc
