"""`cloud.launch`, which starts the demo's and the benchmarks' servers: a server whose log outgrows a pipe keeps
serving, and the log can still be read; a child whose parent died before it asked to die with it still does."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest

import coexit
from cloud.launch import server_log, start_cloud, wait_until
from coexit.v1 import coexit_pb2 as pb
from edge.link import CloudError, CloudLink
from tests.processes import alive

PIPE_BYTES = 65_536  # Linux's default pipe capacity


def test_a_server_keeps_serving_after_its_log_outgrows_a_pipe(tiny_dir):
    """Each new connection's first client fault is logged (cloud.errors.FaultLog: once a period per peer), so a few
    hundred of them log more than a pipe holds. A server whose stderr was a pipe nobody read then stopped at its
    next log line, and the next request ran into its deadline."""
    model = coexit.load(tiny_dir)
    proc, address = start_cloud(tiny_dir)
    try:
        faults = 0
        while len(server_log(proc).encode()) <= 2 * PIPE_BYTES:
            link = CloudLink(address, deadline_s=10.0)  # a new connection: a new peer
            with pytest.raises(CloudError) as info:
                link.stream().request(pb.SessionRequest(open=pb.OpenRequest(fingerprint="0" * 64)))
            link.close()
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION, info.value
            faults += 1
            assert faults <= 2_000, "the server logs too little per client fault for this test"
        link = CloudLink(address, deadline_s=10.0)
        s = link.stream()
        assert s.request(pb.SessionRequest(open=pb.OpenRequest(fingerprint=model.fingerprint))).opened.session_id
        link.close()
        # more than a pipe holds, read back (a peer's port may recur within the period: a line may count several)
        faulted = [ln for ln in server_log(proc).splitlines() if "FAILED_PRECONDITION: model fingerprint" in ln]
        assert sum(map(len, faulted)) > PIPE_BYTES
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_child_whose_parent_died_before_it_asked_to_die_with_it_dies(tmp_path):
    """The kernel signals a parent's death only to children that asked before it (PR_SET_PDEATHSIG). A front end
    still importing when its supervisor was killed asked too late and served on alone; a child that names its
    parent (as the front ends and the engine process do) now finds it gone and goes too."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import multiprocessing as mp, os, signal, time
        from cloud.launch import die_with_parent

        def child():
            time.sleep(2)  # the parent is gone by then
            die_with_parent(signal.SIGKILL, mp.parent_process().pid)
            time.sleep(120)

        if __name__ == "__main__":
            p = mp.get_context("spawn").Process(target=child)
            p.start()
            print(p.pid, flush=True)
            os._exit(0)
    """))
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=root,
                         env={**os.environ, "PYTHONPATH": root})
    child = int(out.stdout.split()[0])
    assert wait_until(lambda: not alive(child), 30), "the child outlived its parent"
