"""docker-compose.yml is valid (Debian's docker-compose `config -q`) and its services run exactly the entry points
that work natively: the cloud command serves, the health-check command reports it healthy, the edge command
completes the demo against it, and the edge-api command serves the OpenAI-compatible API on its published port."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cloud.launch import free_port

ROOT = Path(__file__).resolve().parent.parent
MODEL_IN_IMAGE = "/app/models/coexit-code-small"


@pytest.fixture(scope="module")
def compose():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed: `make setup` installs Debian's docker-compose (needs root)")
    subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], check=True)
    out = subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "config"], check=True, capture_output=True,
                         text=True).stdout
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(out)


def native(cmd: list[str], model_dir, port: int, api_port: int = 0) -> list[str]:
    """The container command with the image's paths, bind address, service name and ports mapped to this machine."""
    mapped = []
    for arg in cmd:
        arg = arg.replace(MODEL_IN_IMAGE, str(model_dir)).replace("0.0.0.0", "127.0.0.1")
        arg = arg.replace("cloud:50151", f"127.0.0.1:{port}").replace("127.0.0.1:50151", f"127.0.0.1:{port}")
        mapped.append(str(port) if arg == "50151" else str(api_port) if arg == "8000" else arg)
    if mapped[0] == "coexit":
        return [sys.executable, "-m", "coexit.cli", *mapped[1:]]
    if mapped[0] == "python":
        return [sys.executable, *mapped[1:]]
    raise AssertionError(f"unexpected entry point {cmd[0]!r}")


def test_compose_services_run_natively(compose, tiny_dir):
    services = {k: v for k, v in compose["services"].items() if not v.get("profiles")}
    assert set(services) == {"cloud", "edge", "edge-api"}
    for name in ("edge", "edge-api"):
        assert services[name]["depends_on"]["cloud"]["condition"] == "service_healthy"
    assert {"published": 8000, "target": 8000} in services["edge-api"]["ports"]  # as `config` normalises it
    for name in ("cloud", "edge", "edge-api"):
        assert (ROOT / services[name]["build"]["dockerfile"]).is_file()
    port = free_port()
    cloud = subprocess.Popen(native(services["cloud"]["command"], tiny_dir, port), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        check = services["cloud"]["healthcheck"]["test"]
        assert check[0] == "CMD"
        health = None
        for _ in range(60):
            health = subprocess.run(native(check[1:], tiny_dir, port), capture_output=True, text=True)
            if health.returncode == 0:
                break
        assert health.returncode == 0, health.stderr
        demo = subprocess.run(native(services["edge"]["command"], tiny_dir, port) + ["--max-new-tokens", "8"],
                              capture_output=True, text=True, timeout=300)
        assert demo.returncode == 0, demo.stderr
        assert "latency per token against cloud-only over an emulated 50 ms RTT" in demo.stdout
        assert "collaborative" in demo.stdout and "cloud-only" in demo.stdout
        api_port = free_port()
        api = subprocess.Popen(native(services["edge-api"]["command"], tiny_dir, port, api_port),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            for _ in range(200):
                try:
                    models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{api_port}/v1/models",
                                                               timeout=2).read())
                    break
                except OSError:
                    assert api.poll() is None, api.stderr.read().decode()
                    time.sleep(0.3)
            assert models["data"][0]["id"] == Path(tiny_dir).name
        finally:
            api.terminate()
            api.wait(10)
    finally:
        cloud.kill()
        cloud.wait()
    assert json.dumps(services)  # the parsed file is plain data


def test_scale_profile_puts_the_shipped_haproxy_in_front_of_two_replicas(compose):
    """`--profile scale`: the balancer mounts deploy/haproxy/haproxy.cfg unchanged, its server list names exactly the
    replicas with their gRPC and health ports, and the edges go through it."""
    scale = {k: v for k, v in compose["services"].items() if "scale" in (v.get("profiles") or [])}
    assert set(scale) == {"cloud1", "cloud2", "balancer", "edge-scale", "edge-api-scale"}
    mount = scale["balancer"]["volumes"][0]
    source = mount["source"] if isinstance(mount, dict) else mount.split(":")[0]
    assert Path(source).resolve() == (ROOT / "deploy" / "haproxy" / "haproxy.cfg").resolve()
    cfg = (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    servers = re.findall(r"^\s*server (\S+) (\S+):(\d+) .*port (\d+)", cfg, re.M)
    assert {(name, host) for name, host, _, _ in servers} == {("cloud1", "cloud1"), ("cloud2", "cloud2")}
    for name, _, grpc_port, health_port in servers:
        cmd = scale[name]["command"]
        assert cmd[cmd.index("--port") + 1] == grpc_port
        assert cmd[cmd.index("--health-http-port") + 1] == health_port
        grace = float(cmd[cmd.index("--drain-grace") + 1])
        assert _seconds(scale[name]["stop_grace_period"]) > grace  # the drain finishes before the kill
    bind = re.search(r'bind "\$\{COEXIT_LB_BIND-:(\d+)\}"', cfg).group(1)
    assert {"published": 50150, "target": int(bind)} in scale["balancer"]["ports"]
    for name in ("edge-scale", "edge-api-scale"):
        assert f"balancer:{bind}" in scale[name]["command"]


def _seconds(value) -> float:
    text = str(value)
    return float(text[:-1]) if text.endswith("s") else float(text)
