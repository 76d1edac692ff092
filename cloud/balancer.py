"""The shipped balancer configurations (deploy/haproxy/haproxy.cfg, deploy/nginx/nginx.conf) run as real processes
in front of loopback replicas, for the tests (tests/cloud/test_balancers.py) and the benchmarks
(bench/balancer_load.py). Only the server list, the listen address and the idle timeout are changed; everything
else is the file as shipped. Needs a checkout (deploy/ is not part of the installed package) and the `haproxy` or
`nginx` binary (`make setup` installs both from Debian's packages as root)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from cloud.launch import dies_with_parent, free_port, wait_healthy

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def installed(kind: str) -> bool:
    return shutil.which(kind) is not None or Path(f"/usr/sbin/{kind}").exists()


def replace_servers(text: str, lines: list[str]) -> str:
    """The config with the lines between `# BEGIN servers` and `# END servers` replaced."""
    begin, end = text.index("# BEGIN servers"), text.index("# END servers")
    indent = text[text.rindex("\n", 0, begin) + 1:begin]
    return text[:begin] + "# BEGIN servers\n" + "".join(f"{indent}{ln}\n" for ln in lines) + indent + text[end:]


class Balancer:
    """One balancer process over the shipped file; `reload()` starts a successor the way an operator would
    (HAProxy: `-sf`, the old process finishes its streams). backends: (gRPC port, health port) per replica."""

    def __init__(self, kind: str, backends: list[tuple[int, int]], workdir: Path, idle_s: float = 60.0,
                 health_inter_ms: int = 200) -> None:
        self.kind, self.workdir = kind, Path(workdir)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ)
        idle_ms = int(idle_s * 1000)
        if kind == "haproxy":
            text = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
            text = replace_servers(text, [f"server r{i} 127.0.0.1:{p} proto h2 check-proto h1 port {h}"
                                          for i, (p, h) in enumerate(backends)])
            self.env.update(COEXIT_LB_BIND=self.address, COEXIT_IDLE_TIMEOUT=f"{idle_ms}ms",
                            COEXIT_HEALTH_INTER=f"{health_inter_ms}ms")
        elif kind == "nginx":
            text = (DEPLOY / "nginx" / "nginx.conf").read_text()
            text = replace_servers(text, [f"server 127.0.0.1:{p} max_fails=1 fail_timeout=30s;" for p, _ in backends])
            text = text.replace("listen 50151 http2;", f"listen {self.address} http2;")
            text = text.replace(" 60s;", f" {idle_ms}ms;")
            for d in TEMP_DIRS:
                (self.workdir / d).mkdir(exist_ok=True)
            text = text.replace("http {\n", "http {\n" + "".join(f"    {d}_temp_path {self.workdir / d};\n"
                                                                 for d in TEMP_DIRS), 1)
        else:
            raise ValueError(f"unknown balancer {kind!r}: haproxy or nginx")
        self.conf = self.workdir / f"{kind}.conf"
        self.conf.write_text(text)
        self.start()

    def _cmd(self) -> list[str]:
        if self.kind == "haproxy":
            return ["haproxy", "-db", "-f", str(self.conf)]
        return ["nginx", "-c", str(self.conf), "-p", str(self.workdir), "-g",
                f"daemon off; pid {self.workdir / 'nginx.pid'}; error_log stderr error;"]

    def start(self, extra: list[str] | None = None) -> None:
        self.procs.append(subprocess.Popen(dies_with_parent(self._cmd() + (extra or [])), env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_healthy(self.address, timeout_s=30)

    def reload(self) -> None:
        self.start(["-sf", str(self.procs[-1].pid)])

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=10)
