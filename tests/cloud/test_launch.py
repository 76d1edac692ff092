"""`start_cloud`, which starts the demo's and the benchmarks' servers: a server whose log outgrows a pipe keeps
serving, and the log can still be read."""

from __future__ import annotations

import grpc
import pytest

import coexit
from cloud.launch import server_log, start_cloud
from coexit.v1 import coexit_pb2 as pb
from edge.link import CloudError, CloudLink

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
