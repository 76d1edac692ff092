"""The `coexit` command as a new user meets it: every bad input of issue #21 runs as a real subprocess and must end
with a non-zero exit code and one line on stderr that names the problem, never a traceback; signals stop the
command and every process it started.

The cases run concurrently (a thread pool over subprocesses) once per session; each test then checks its own."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cloud.launch import free_port, start_cloud, wait_until
from tests.processes import alive, children

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "models" / "coexit-code-small")
TOKEN = "s3cret-token"


def coexit(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", COEXIT_DEBUG="")
    env.pop("COEXIT_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "coexit.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=kw.get("cwd", ROOT))


@pytest.fixture(scope="module")
def deep_only_cloud():
    """A real `coexit serve --deep-only --token`: refuses token input, and anyone without the token."""
    proc, address = start_cloud(MODEL, extra_args=["--deep-only", "--token", TOKEN])
    yield address
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def no_tokenizer_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("no-tokenizer")
    for f in ("config.json", "model.safetensors"):
        shutil.copy(Path(MODEL) / f, d / f)
    return str(d)


@pytest.fixture(scope="module")
def held_port():
    """A port another process holds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# name -> (argv, words the one line must contain, expected exit code)
def cases(cloud: str, no_tok: str, held: int, nothing: str, tmp: Path) -> dict:
    gen = ["generate", "--model", MODEL]
    alone = [*gen, "--mode", "standalone"]
    return {
        # a wrong --model, in every command that takes one
        "serve-model": (["serve", "--model", "/no/such/model"], ["/no/such/model", "does not exist"], 1),
        "generate-model": (["generate", "--model", "/no/such/model", "--mode", "standalone", "x"],
                           ["/no/such/model", "does not exist"], 1),
        "edge-serve-model": (["edge-serve", "--model", "/no/such/model", "--mode", "standalone"],
                             ["/no/such/model"], None),
        "evaluate-model": (["evaluate", "--model", "/no/such/model", "--data", MODEL], ["/no/such/model"], 1),
        "calibrate-model": (["calibrate", "--model", "/no/such/model", "--data", MODEL], ["/no/such/model"], 1),
        "no-tokenizer": (["generate", "--model", no_tok, "--mode", "standalone", "def f():"],
                         ["tokenizer.json"], 2),
        # ports in use
        "serve-port": (["serve", "--model", MODEL, "--port", str(held)], [f"--port {held}", "pick another"], 2),
        "serve-tp-without-torchrun": (["serve", "--model", MODEL, "--tp", "2"],
                                      ["--tp 2", "torchrun --nproc_per_node 2 -m coexit serve --tp 2"], 2),
        "serve-metrics-port": (["serve", "--model", MODEL, "--port", str(free_port()), "--metrics-port", str(held)],
                               [f"--metrics-port {held}"], 2),
        "edge-serve-port": (["edge-serve", "--model", MODEL, "--mode", "standalone", "--port", str(held)],
                            [str(held)], None),
        # the cloud: down, refusing the token, or unable to do what was asked
        "cloud-down-cloud-only": ([*gen, "--cloud", nothing, "--mode", "cloud-only", "x"],
                                  ["cannot reach", nothing, "--cloud"], 1),
        "cloud-down-lossless": ([*gen, "--cloud", nothing, "--mode", "lossless", "--deadline", "0.5", "x"],
                                ["cannot reach", nothing], 1),
        "demo-cloud-down": (["demo", "--cloud", nothing], ["no coexit cloud answers", nothing], 2),
        "wrong-token": ([*gen, "--cloud", cloud, "--token", "wrong", "x"], ["pass --token"], 1),
        "missing-token": ([*gen, "--cloud", cloud, "x"], ["pass --token"], 1),
        "cloud-only-deep-only": ([*gen, "--cloud", cloud, "--token", TOKEN, "--mode", "cloud-only", "x"],
                                 ["FAILED_PRECONDITION", "only the deep layers"], 1),
        # flags and numbers
        "thresholds-syntax": ([*alone, "--thresholds", "2:0.8", "x"], ["LAYER=VALUE", "2:0.8"], 2),
        "thresholds-not-an-exit": ([*alone, "--thresholds", "2=0.8,3=0.9", "x"], ["layer 3", "2, 4"], 2),
        "threshold-range": ([*alone, "--threshold", "1.5", "x"], ["[0, 1]", "1.5"], 2),
        "temperature": ([*alone, "--temperature", "-1", "x"], ["temperature", "-1"], 2),
        "top-p": ([*alone, "--top-p", "0", "x"], ["top_p", "(0, 1]"], 2),
        "max-new-tokens": ([*alone, "--max-new-tokens", "-1", "x"], ["--max-new-tokens", "-1"], 2),
        "collaborative-without-cloud": ([*gen, "x"], ["--cloud", "standalone"], 2),
        "standalone-with-cloud": ([*alone, "--cloud", nothing, "x"], ["never uses the cloud"], 2),
        "criterion-with-calibrated": ([*alone, "--criterion", "entropy", "x"], ["--criterion", "calibrated"], 2),
        "lossless-propagate": ([*gen, "--cloud", nothing, "--mode", "lossless", "--kv-fill", "propagate", "x"],
                               ["--kv-fill propagate", "collaborative"], 2),
        "quant-unknown": ([*alone, "--backend", "gguf", "--quant", "q3", "x"], ["'q3'", "q8_0"], 2),
        "quant-without-gguf": ([*alone, "--quant", "q4_0", "x"], ["--backend gguf"], 2),
        "context": ([*alone, "--max-new-tokens", "2000", "x"], ["context", "1024"], 2),
        "tls-key-only": (["serve", "--model", MODEL, "--tls-key", "/no/key.pem"], ["--tls-key without --tls-cert"], 2),
        "tls-missing-file": (["serve", "--model", MODEL, "--tls-key", "/no/key.pem", "--tls-cert", "/no/c.pem"],
                             ["--tls-key /no/key.pem", "no such file"], 2),
        "calibrate-target": (["calibrate", "--model", MODEL, "--data", MODEL, "--target", "1.5"],
                             ["--target", "1.5"], 2),
        "calibrate-no-corpus": (["calibrate", "--model", MODEL, "--data", "data/corpus/heldout.jsonl"],
                                ["heldout.jsonl", "coexit build-corpus"], 2),
        "evaluate-no-corpus": (["evaluate", "--model", MODEL, "--data", "data/corpus/heldout.jsonl"],
                               ["heldout.jsonl", "coexit build-corpus"], 2),
        "calibrate-bad-jsonl": (["calibrate", "--model", MODEL, "--data", str(tmp / "cut.jsonl")],
                                ["cut.jsonl:2", "not valid JSON"], 2),
        "calibrate-jsonl-no-text": (["calibrate", "--model", MODEL, "--data", str(tmp / "untitled.jsonl")],
                                    ["untitled.jsonl:1", "'text'"], 2),
        "compress-budget": (["compress", "--model", MODEL, "--budget-bpw", "3"], ["--budget-bpw 3", "4.50"], 2),
        "export-policy-and-quant": (["export-edge", "--model", MODEL, "--budget-bpw", "5", "--quant", "q8_0"],
                                    ["drop --quant"], 2),
        "unknown-command": (["gnerate"], ["unknown command", "generate"], 2),
    }


CASE_NAMES = list(cases("c", "t", 1, "n", Path(".")))


@pytest.fixture(scope="module")
def results(deep_only_cloud, no_tokenizer_model, held_port, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    nothing = f"127.0.0.1:{free_port()}"
    (tmp / "cut.jsonl").write_text('{"text": "def f():\\n    return 1\\n"}\n{"text": "def g(x):\\n  ')  # cut short
    (tmp / "untitled.jsonl").write_text('{"body": "x = 1"}\n')
    table = cases(deep_only_cloud, no_tokenizer_model, held_port, nothing, tmp)
    with ThreadPoolExecutor(4) as pool:
        futures = {name: pool.submit(coexit, *argv, cwd=tmp) for name, (argv, _, _) in table.items()}
        return {name: (table[name], f.result()) for name, f in futures.items()}


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_line(results, name):
    (argv, words, code), r = results[name]
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and (code is None or r.returncode == code), (r.returncode, r.stderr)
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_unknown_quant_writes_nothing(results, tmp_path):
    assert not list(Path(MODEL).glob("edge-q3*"))


def test_help_version_and_debug(tmp_path):
    top = coexit("--help")
    assert top.returncode == 0
    for name in ("demo", "serve", "generate", "edge-serve", "calibrate", "train"):
        line = next(ln for ln in top.stdout.splitlines() if ln.strip().startswith(name + " "))
        assert len(line.split(None, 1)[1]) > 20, line  # a description, not just the name
    v = coexit("--version")
    assert v.returncode == 0 and v.stdout.startswith("coexit 0.")
    sub = " ".join(coexit("generate", "--help").stdout.split())
    assert "(default: 48)" in sub and "(default: collaborative)" in sub
    debug = coexit("--debug", "serve", "--model", "/no/such/model")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "does not exist" in debug.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_demo_server_dies_with_the_demo(sig):
    """kill -TERM (and even kill -KILL, or a closed terminal) on the demo leaves no `coexit serve` behind."""
    demo = subprocess.Popen([sys.executable, "-m", "coexit.cli", "demo", "--link", "none", "--color", "never"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert demo.stdout.readline().startswith("starting the cloud service")
        assert wait_until(lambda: children(demo.pid), 30)
        server = children(demo.pid)[0]
        time.sleep(1)
        demo.send_signal(sig)
        demo.wait(timeout=30)
        assert wait_until(lambda: not alive(server), 30), "the demo's cloud server outlived it"
        if sig == signal.SIGTERM:
            err = [ln for ln in demo.stderr.read().splitlines() if ln.strip() and "prompt" not in ln]
            assert demo.returncode == 130 and err == ["coexit demo: interrupted (SIGTERM)"], err
    finally:
        demo.kill()
        demo.wait()


def test_ctrl_c_in_generate_is_one_line():
    """Ctrl-C while generate waits for a cloud that accepted the connection but never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(60)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        p = subprocess.Popen([sys.executable, "-m", "coexit.cli", "generate", "--model", MODEL, "--cloud", address,
                              "--mode", "cloud-only", "--deadline", "60", "x"], stderr=subprocess.PIPE, text=True,
                             cwd=ROOT)
        conn, _ = listener.accept()  # the client is now blocked on the cloud
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
        conn.close()
    assert p.returncode == 130 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.strip()] == ["coexit generate: interrupted (SIGINT)"]


def test_ctrl_c_in_serve_with_frontends_stops_every_process():
    """Ctrl-C reaches the whole process group: the supervisor, its engine and front ends; none prints a traceback
    and none is left behind."""
    from cloud.launch import wait_healthy

    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "coexit.cli", "serve", "--model", MODEL, "--port", str(port),
                          "--frontends", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        wait_healthy(f"127.0.0.1:{port}", timeout_s=120, proc=p)
        kids = children(p.pid)
        assert len(kids) >= 3  # engine + 2 front ends (+ multiprocessing's resource tracker)
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0 and "Traceback" not in err, err
        assert wait_until(lambda: not any(alive(c) for c in kids), 30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
