"""Security end to end: Redis over TLS with an ACL user, and a password-protected embedded server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker.embedded import EmbeddedValkey, free_port
from tests.calmproc import calm_up, collect, send

pytestmark = pytest.mark.slow


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[str]:
    """Debian's redis-server with TLS only (no plain port), the default user off and an ACL user ``calm``."""
    server, openssl = shutil.which("redis-server"), shutil.which("openssl")
    if not server or not openssl:
        pytest.skip("needs redis-server and openssl (Debian packages) for a TLS server")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out",
                    "cert.pem", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   cwd=tmp_path, check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", "0", "--tls-port", str(port), "--tls-cert-file", "cert.pem", "--tls-key-file", "key.pem",
         "--tls-ca-cert-file", "cert.pem", "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
         "--user", "default", "off", "--user", "calm", "on", ">calm-pass", "~*", "&*", "+@all", "--dir", str(tmp_path)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"rediss://calm:calm-pass@127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'cert.pem'}"
    try:
        for _ in range(200):  # TLS start-up (loading the key) can take a while on a busy machine
            try:
                if redis.Redis.from_url(url).ping():
                    break
            except redis.exceptions.ConnectionError:
                if proc.poll() is not None:
                    pytest.fail(f"the TLS redis-server exited at start ({proc.returncode})")
                time.sleep(0.05)
        else:
            pytest.fail("the TLS redis-server did not answer within 10 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_system_runs_over_tls_with_an_acl_user(tiny_fleet: Path, tls_server: str, prefix: str) -> None:
    client = redis.Redis.from_url(tls_server)
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(tls_server.replace("calm-pass", "xq-bad-secret")).ping()
    with calm_up(tls_server, prefix, tiny_fleet):
        send(client, prefix, prompt="21+21=", id="tls-1", max_new_tokens="4")
        got = collect(client, f"{prefix}replies", {"tls-1"})
    assert got["tls-1"][0]["status"] == "ok"


def test_a_wrong_password_is_a_clear_one_line_error(tls_server: str) -> None:
    env = {**os.environ, "CALM_REDIS_URL": tls_server.replace("calm-pass", "xq-bad-secret")}
    proc = subprocess.run([sys.executable, "-m", "calm", "status", "--json"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 1
    assert proc.stderr.startswith("calm: authentication failed at rediss://***@127.0.0.1")
    assert "xq-bad-secret" not in proc.stderr, "secrets never reach the output"


def test_the_system_runs_on_a_password_protected_embedded_server(tiny_fleet: Path, prefix: str) -> None:
    with EmbeddedValkey(password="pw-123") as server:
        client = redis.Redis.from_url(server.url)
        with calm_up(server.url, prefix, tiny_fleet):
            send(client, prefix, prompt="2+2=", id="auth-1", max_new_tokens="4")
            got = collect(client, f"{prefix}replies", {"auth-1"})
    assert got["auth-1"][0]["status"] == "ok"
