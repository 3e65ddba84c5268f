"""`lmforge serve` with API keys and TLS (issue 19 item 3), the real command in a subprocess: keys from
--api-key, $LMFORGE_API_KEY and --api-key-file all open the API and nothing else does (401 in
OpenAI's shape on every path but /health), HTTPS with a certificate made here, and the warning for
an open address without a key."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
import time

import httpx2 as httpx
import openai
import pytest

from lmforge.serving.launch import exposure_warning, read_keys
from tests.helpers import free_port, stop_process_group
from tests.integration.test_openai_server import make_model_dir

NAME = "tiny"


def self_signed(directory) -> tuple[str, str]:
    """A key and a certificate for 127.0.0.1, made with the cryptography package: (keyfile, certfile)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    keyfile, certfile = directory / "key.pem", directory / "cert.pem"
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(keyfile), str(certfile)


def start(model_dir, *options, env=None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--model", str(model_dir), "--name", NAME,
                             "--port", str(port), *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, **(env or {})})
    return proc, port


def wait_healthy(proc, url: str, **client) -> None:
    for _ in range(600):
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(f"{url}/health", timeout=2, **client).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not come up")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("keys") / "model")


def test_keys_from_flag_env_and_file_open_the_api_over_https(model_dir, tmp_path):
    keyfile, certfile = self_signed(tmp_path)
    (tmp_path / "keys.txt").write_text("# one key per user\nalice-key\n\nbob-key\n", encoding="utf-8")
    proc, port = start(model_dir, "--api-key", "flag-key", "--api-key-file", str(tmp_path / "keys.txt"),
                       "--ssl-keyfile", keyfile, "--ssl-certfile", certfile, env={"LMFORGE_API_KEY": "env-key"})
    url = f"https://127.0.0.1:{port}"
    tls = {"verify": ssl.create_default_context(cafile=certfile)}
    try:
        wait_healthy(proc, url, **tls)
        with httpx.Client(base_url=url, timeout=60, **tls) as http:
            for path, method, payload in [("/v1/models", "GET", None), (f"/v1/models/{NAME}", "GET", None),
                                          ("/metrics", "GET", None), ("/tokenizer_info", "GET", None),
                                          ("/v1/completions", "POST", {"model": NAME, "prompt": "the"}),
                                          ("/v1/chat/completions", "POST", {"model": NAME}),
                                          ("/tokenize", "POST", {"prompt": "the"}), ("/nothing", "GET", None)]:
                for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "flag-key"},
                                {"authorization": "Basic flag-key"}):
                    refused = http.request(method, path, json=payload, headers=headers)
                    assert refused.status_code == 401, (path, headers)
                    assert refused.json()["error"]["code"] == "invalid_api_key"
                    assert refused.headers["www-authenticate"] == "Bearer"
            assert http.get("/health").status_code == 200  # open: what a load balancer probes
        for key in ("flag-key", "env-key", "alice-key", "bob-key"):
            with openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0,
                               http_client=httpx.Client(**tls)) as client:
                assert client.completions.create(model=NAME, prompt="the", max_tokens=3).usage.completion_tokens >= 1
        with openai.OpenAI(base_url=f"{url}/v1", api_key="mallory", max_retries=0,
                           http_client=httpx.Client(**tls)) as client, pytest.raises(openai.AuthenticationError):
            client.models.list()
        with pytest.raises(httpx.TransportError):  # plain HTTP is not spoken
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        stop_process_group(proc)


def test_an_open_address_without_a_key_is_warned_about(model_dir):
    proc, port = start(model_dir, "--host", "0.0.0.0")
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}")
    finally:
        stop_process_group(proc)
    warning = proc.stderr.read()
    assert "warning: serving on 0.0.0.0 without an API key, in plain HTTP: anyone who can reach" in warning
    assert exposure_warning("127.0.0.1", frozenset(), False) is None
    assert exposure_warning("::1", frozenset(), False) is None
    assert exposure_warning("0.0.0.0", frozenset({"k"}), False) is None
    assert "in plain HTTP" not in exposure_warning("10.0.0.5", frozenset(), True)


def test_key_files_are_read_and_bad_ones_are_one_clear_line(tmp_path, model_dir):
    from lmforge.errors import LmforgeError

    (tmp_path / "keys").write_text("a\n  b  \n# c\n", encoding="utf-8")
    assert read_keys(None, str(tmp_path / "keys"), {}) == {"a", "b"}
    assert read_keys("x", None, {"LMFORGE_API_KEY": "y"}) == {"x", "y"}
    assert read_keys(None, None, {}) == frozenset()
    (tmp_path / "empty").write_text("# nothing\n", encoding="utf-8")
    for path, message in [(tmp_path / "empty", "holds no key"), (tmp_path / "missing", "cannot read the API key")]:
        with pytest.raises(LmforgeError, match=message):
            read_keys(None, str(path), {})
    proc = subprocess.run([sys.executable, "-m", "lmforge", "serve", "--model", str(model_dir), "--api-key-file",
                           str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: cannot read the API key file")
    assert len(proc.stderr.strip().splitlines()) == 1
