"""The Kubernetes manifests (deploy/k8s/) validate offline against the Kubernetes schemas (kubernetes-validate
bundles them), and agree with each other and with the shipped HAProxy configuration: the ConfigMap is
deploy/haproxy/haproxy.cfg with only the server list changed, the grace period covers preStop and the drain, and the
probes and the balancer use the ports the server is started with."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"


def documents() -> list[dict]:
    return [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def find(kind: str, name: str) -> dict:
    return next(d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_validates(doc):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_kinds_an_operator_expects():
    kinds = {(d["kind"], d["metadata"]["name"]) for d in documents()}
    assert {("Deployment", "coexit-cloud"), ("Service", "coexit-cloud-headless"), ("PodDisruptionBudget",
            "coexit-cloud"), ("HorizontalPodAutoscaler", "coexit-cloud"), ("ConfigMap", "coexit-haproxy"),
            ("Deployment", "coexit-haproxy"), ("Service", "coexit")} <= kinds
    assert find("Service", "coexit-cloud-headless")["spec"]["clusterIP"] == "None"
    hpa = find("HorizontalPodAutoscaler", "coexit-cloud")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "coexit_kv_blocks_used"


def _servers_block(text: str) -> tuple[str, str]:
    begin, end = text.index("# BEGIN servers"), text.index("# END servers")
    return text[:begin], text[end:]


def test_configmap_is_the_shipped_haproxy_cfg():
    shipped = (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    cfg = find("ConfigMap", "coexit-haproxy")["data"]["haproxy.cfg"]
    head, tail = _servers_block(shipped)
    k_head, k_tail = _servers_block(cfg)
    assert k_head == head and k_tail.startswith(tail.rstrip("\n"))  # then only its resolvers section
    assert "server-template" in cfg and "resolvers cluster" in cfg
    if shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists():
        r = subprocess.run(["haproxy", "-c", "-f", "/dev/stdin"], input=cfg, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_drain_fits_the_grace_period_and_ports_agree():
    pod = find("Deployment", "coexit-cloud")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    args = c["args"]
    arg = lambda flag: args[args.index(flag) + 1]  # noqa: E731
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(arg("--drain-grace"))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": int(arg("--port")), "health": int(arg("--health-http-port")),
                     "metrics": int(arg("--metrics-port"))}
    assert c["readinessProbe"]["grpc"]["port"] == ports["grpc"]
    cfg = find("ConfigMap", "coexit-haproxy")["data"]["haproxy.cfg"]
    m = re.search(r"server-template \S+ \S+ coexit-cloud-headless\.(\S+?)\.svc\.cluster\.local:(\d+) .* port (\d+)",
                  cfg)
    assert (int(m.group(2)), int(m.group(3))) == (ports["grpc"], ports["health"])
    assert m.group(1) == next(d for d in documents() if d["kind"] == "Namespace")["metadata"]["name"]
