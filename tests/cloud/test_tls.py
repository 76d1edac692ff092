"""TLS: `coexit serve --tls-key/--tls-cert` with a certificate made here; the edge SDK and `coexit generate` connect
with --tls-ca and get the full model's tokens; a plaintext client and a client trusting another CA are refused."""

from __future__ import annotations

import subprocess

import grpc
import pytest

import coexit
from cloud.launch import start_cloud
from coexit.decoding import generate_full
from coexit.exits import ExitPolicy
from edge.backends import TorchBackend
from edge.client import EdgeClient
from edge.link import CloudError, CloudLink


def make_cert(directory, name: str) -> tuple[str, str]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return str(key), str(cert)


@pytest.fixture(scope="module")
def tls_server(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    key, cert = make_cert(d, "server")
    _, other = make_cert(d, "other")
    proc, address = start_cloud(tiny_dir, extra_args=["--tls-key", key, "--tls-cert", cert],
                                root_cert=open(cert, "rb").read())
    yield address, cert, other
    proc.kill()
    proc.wait()


def test_tls_client_gets_the_full_models_tokens(tiny_dir, tls_server, capsys):
    address, cert, _ = tls_server
    full = coexit.load(tiny_dir)
    ids = full.tokenizer.encode("def add(a, b):", add_bos=True)
    client = EdgeClient(TorchBackend.from_checkpoint(tiny_dir), full.tokenizer, cloud=address, tls_ca=cert)
    assert client.generate(ids, 6, policy=ExitPolicy.never(), stop_at_eos=False).tokens == generate_full(full, ids, 6)
    client.close()

    from edge.apps.generate import main

    assert main(["--model", str(tiny_dir), "--cloud", address, "--tls-ca", cert, "--threshold", "1",
                 "--max-new-tokens", "4", "--color", "never", "def add(a, b):"]) == 0
    assert "[C]" in capsys.readouterr().out  # every token came from the cloud, over TLS


@pytest.mark.parametrize("trust", ["plaintext", "other CA"])
def test_untrusted_or_plaintext_clients_are_refused(tls_server, trust):
    address, _, other = tls_server
    link = CloudLink(address, deadline_s=3.0, root_cert=None if trust == "plaintext" else open(other, "rb").read())
    with pytest.raises(CloudError) as info:
        link.info()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    link.close()
