"""`coexit serve --frontends 2`: two gRPC front-end processes on one port and one engine process. The same
tokens as the full model in every mode, errors keep their status codes across the process hop, a session opened
through one connection resumes through another, the metrics count exactly the tokens served, and killing the
supervisor takes the whole group down; SIGINT stops it (and a one-process server) even where it was started with
SIGINT ignored, and SIGHUP does not where it was started under nohup."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
import urllib.request

import grpc
import pytest
import torch

import coexit
from cloud.launch import free_port, start_cloud, wait_until
from coexit.decoding import generate_full
from coexit.exits import ExitPolicy
from coexit.sampling import SamplingParams
from coexit.v1 import coexit_pb2 as pb
from coexit.v1.convert import tensor_to_proto
from edge.backends import TorchBackend
from edge.client import EdgeClient
from edge.link import CloudError, CloudLink
from tests.processes import alive, children


@pytest.fixture(scope="module")
def group(tiny_dir):
    mport = free_port()
    proc, address = start_cloud(tiny_dir, extra_args=["--frontends", "2", "--metrics-port", str(mport)])
    yield proc, address, mport
    proc.kill()
    proc.wait()


def tokens_total(mport: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
    return float(re.search(r"^coexit_tokens_total (\S+)$", text, re.M).group(1))


def test_tokens_equal_the_full_model_in_every_mode(tiny_dir, group):
    _, address, mport = group
    full = coexit.load(tiny_dir)
    ids = full.tokenizer.encode("for i in range(3):", add_bos=True)
    expected = generate_full(full, ids, 8)
    before = tokens_total(mport)
    results = {}

    def run(mode):  # several clients at once, so ticks batch sessions from both front ends
        client = EdgeClient(TorchBackend.from_checkpoint(tiny_dir), full.tokenizer, cloud=address, mode=mode)
        results[mode] = client.generate(ids, 8, policy=ExitPolicy.never(), stop_at_eos=False).tokens
        client.close()

    modes = ("collaborative", "cloud-only", "naive-split", "lossless")  # lossless: drafts, verdicts, rollbacks
    threads = [threading.Thread(target=run, args=(m,)) for m in modes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {m: expected for m in modes}
    assert tokens_total(mport) - before >= 4 * 8  # lossless: one per verified draft, more after rejections


def test_errors_and_resume_across_connections(tiny_dir, group):
    _, address, _ = group
    full = coexit.load(tiny_dir)
    ids = torch.tensor([full.tokenizer.encode("def add(a, b):\n    return a + b", add_bos=True)])
    with torch.no_grad():
        rows = full.stage(0, full.config.split_layer)(ids).hidden[0]

    def append(stream, first, x):
        return stream.request(pb.SessionRequest(append=pb.AppendRequest(
            first_position=first, hidden=tensor_to_proto(x, "fp32"), want_token=True,
            sampling=pb.Sampling(temperature=0.8, seed=3)))).appended

    link = CloudLink(address)
    s = link.stream()
    op = s.request(pb.SessionRequest(open=pb.OpenRequest(fingerprint=full.fingerprint))).opened
    assert append(s, 0, rows[:6]).length == 6
    with pytest.raises(CloudError) as info:
        append(s, 9, rows[6:7])  # a gap: refused in the engine process, INVALID_ARGUMENT here
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "gap" in info.value.details
    link.close()
    for _ in range(4):  # fresh connections land on either front end; the session lives in the engine
        link = CloudLink(address)
        s = link.stream()
        op2 = s.request(pb.SessionRequest(open=pb.OpenRequest(fingerprint=full.fingerprint,
                                                              resume_id=op.session_id))).opened
        assert op2.resumed and op2.length == 6
        s.cancel()
        link.close()
        time.sleep(0.05)
    link = CloudLink(address)
    s = link.stream()
    s.request(pb.SessionRequest(open=pb.OpenRequest(fingerprint=full.fingerprint, resume_id=op.session_id)))
    got = append(s, 6, rows[6:8])
    # the same token as computing the whole prefix in one go, with the same (seed, position) draw
    logits = full(ids[:, :8]).logits[0, -1]
    expect = coexit.sample(logits, SamplingParams(temperature=0.8, seed=3), position=8)[0]
    assert got.token_id == expect
    with pytest.raises(CloudError) as info:
        link.stream().request(pb.SessionRequest(open=pb.OpenRequest(fingerprint=full.fingerprint,
                                                                    resume_id="no-such-id")))
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    link.close()


def test_killing_the_supervisor_stops_the_group(tiny_dir):
    port = free_port()
    proc, address = start_cloud(tiny_dir, port, extra_args=["--frontends", "2"])
    assert CloudLink(address).info().num_layers == 6
    kids = children(proc.pid)  # the engine, both front ends (one may still be starting) and mp's resource tracker
    proc.kill()  # SIGKILL: no cleanup code runs; the children must still go
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            grpc.channel_ready_future(grpc.insecure_channel(address)).result(timeout=0.5)
        except grpc.FutureTimeoutError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("front-end processes outlived their supervisor")
    assert wait_until(lambda: not any(map(alive, kids)), 60), "a child outlived the supervisor"


def start_with_ignored(model_dir, extra_args: list[str], ignored: tuple, out_path) -> tuple[subprocess.Popen, str]:
    """`coexit serve` started with `ignored` signals set to SIG_IGN, as a shell script's background job (SIGINT)
    or `nohup` (SIGHUP) starts it; its stdout goes to out_path."""
    before = {sig: signal.signal(sig, signal.SIG_IGN) for sig in ignored}  # inherited through exec
    try:
        with open(out_path, "w") as out:
            return start_cloud(model_dir, extra_args=extra_args, stdout=out)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def healthy(address: str) -> bool:
    try:
        CloudLink(address, deadline_s=5).info()
        return True
    except Exception:
        return False


@pytest.mark.parametrize("frontends", [0, 2])
def test_sigint_stops_a_background_server_and_nohup_keeps_it_through_sighup(tiny_dir, tmp_path, frontends):
    """A script's background job inherits SIGINT ignored, and `nohup` SIGHUP ignored: `kill -INT` still stops the
    server (the supervisor draining its front ends), with exit code 0, while a SIGHUP leaves it serving. The
    supervisor's banner names the dtype the engine process serves in."""
    extra = ["--frontends", str(frontends)] if frontends else []
    out = tmp_path / "out.txt"
    proc, address = start_with_ignored(tiny_dir, extra, (signal.SIGINT, signal.SIGHUP), out)

    def banner() -> list[str]:
        return [line for line in out.read_text().splitlines() if line.startswith("coexit cloud serving")]

    try:
        assert wait_until(banner, 30), out.read_text()  # (the supervisor prints it once its own health check passes)
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert proc.poll() is None and healthy(address), "SIGHUP stopped a server started under nohup"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert not healthy(address)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(banner()) == 1 and ", float32" in banner()[0], out.read_text()
