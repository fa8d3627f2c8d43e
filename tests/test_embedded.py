"""The embedded Valkey: starts on a free port, speaks streams, is reaped, dies with its parent; resolve()."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import broker.connection as connection
from broker.config import RedisSettings
from broker.connection import ResolvedRedis, answers, resolve
from broker.embedded import EmbeddedValkey, free_port
from broker.errors import ConnectionFailed, EmbeddedServerError

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 30.0  # generous bound on waits for a process to go; never a speed check


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def server() -> Iterator[EmbeddedValkey]:
    with EmbeddedValkey() as s:
        yield s


def test_starts_on_a_free_port_and_answers_ping(server: EmbeddedValkey) -> None:
    assert server.pid is not None and _running(server.pid)
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    client = redis.Redis.from_url(server.url)
    try:
        assert client.ping() is True
        assert answers(server.url)
    finally:
        client.close()


def test_two_servers_get_different_ports(server: EmbeddedValkey) -> None:
    with EmbeddedValkey() as other:
        assert other.port != server.port
        assert other.pid != server.pid
        assert answers(other.url)


def test_supports_consumer_groups_and_autoclaim(server: EmbeddedValkey) -> None:
    client = redis.Redis.from_url(server.url)
    try:
        client.xgroup_create("s", "g", id="0", mkstream=True)
        first = client.xadd("s", {"n": "1"})
        client.xadd("s", {"n": "2"})
        read = client.xreadgroup("g", "c1", {"s": ">"}, count=10)
        assert [fields[b"n"] for _, fields in read[0][1]] == [b"1", b"2"]
        assert client.xack("s", "g", first) == 1
        # c1 dies holding entry 2; c2 reclaims it
        _, claimed, _ = client.xautoclaim("s", "g", "c2", min_idle_time=0, start_id="0-0")
        assert [fields[b"n"] for _, fields in claimed] == [b"2"]
        pending = client.xpending_range("s", "g", min="-", max="+", count=10)
        assert [p["consumer"] for p in pending] == [b"c2"]
        assert pending[0]["times_delivered"] == 2
    finally:
        client.close()


def test_stop_reaps_the_server() -> None:
    s = EmbeddedValkey().start()
    pid, port = s.pid, s.port
    assert pid is not None and _port_open(port)
    s.stop()
    assert s.pid is None
    assert not _running(pid)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not left a zombie
    assert not _port_open(port)
    s.stop()  # idempotent


def test_context_manager_stops_on_error() -> None:
    with pytest.raises(RuntimeError, match="inside"), EmbeddedValkey() as s:
        pid = s.pid
        raise RuntimeError("inside")
    assert pid is not None and not _running(pid)


def test_occupied_port_is_an_error_not_someone_elses_server(server: EmbeddedValkey) -> None:
    other = EmbeddedValkey(port=server.port)
    with pytest.raises(EmbeddedServerError):
        other.start()
    assert other.pid is None
    assert answers(server.url)  # the original is untouched


_CHILD = """
import sys, time
from broker.embedded import EmbeddedValkey
server = EmbeddedValkey().start()
print(server.pid, server.port, flush=True)
time.sleep(120)
"""


def test_server_dies_when_its_parent_is_killed() -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD], cwd=REPO, stdout=subprocess.PIPE, text=True)
    server_pid = 0
    try:
        line = child.stdout.readline() if child.stdout else ""
        assert line, "the child did not report a server"
        server_pid, port = (int(x) for x in line.split())
        assert _running(server_pid) and _port_open(port)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=HANG_GUARD_S)
        assert _wait_gone(server_pid), "the embedded server outlived its SIGKILLed parent"
        assert not _port_open(port)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout:
            child.stdout.close()
        if server_pid and _running(server_pid):
            os.kill(server_pid, signal.SIGKILL)


def test_password_protected_server() -> None:
    with EmbeddedValkey(password="s3cret") as s:
        assert s.url == f"redis://:s3cret@127.0.0.1:{s.port}/0"
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as raw:
            raw.sendall(b"SET k anonymous\r\n")
            assert raw.recv(256).startswith(b"-NOAUTH")
        wrong = redis.Redis.from_url(f"redis://:nope@127.0.0.1:{s.port}/0")
        good = redis.Redis.from_url(s.url)
        try:
            with pytest.raises(redis.exceptions.AuthenticationError):
                wrong.ping()
            assert good.get("k") is None  # the anonymous SET did not happen
            assert good.set("k", "v") is True
            assert good.get("k") == b"v"
        finally:
            wrong.close()
            good.close()
        assert not answers(f"redis://127.0.0.1:{s.port}/0")
        assert answers(s.url)


# -- resolve -------------------------------------------------------------------------


def _unused_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def test_resolve_explicit_url_that_does_not_answer() -> None:
    with pytest.raises(ConnectionFailed, match="no Redis server answers"):
        resolve(RedisSettings(url=_unused_url(), connect_timeout_s=0.5))


def test_resolve_redacts_the_password() -> None:
    url = f"redis://:topsecret@127.0.0.1:{free_port()}/0"
    with pytest.raises(ConnectionFailed) as info:
        resolve(RedisSettings(url=url, connect_timeout_s=0.5))
    assert "topsecret" not in str(info.value)
    assert "***@127.0.0.1" in str(info.value)


def test_resolve_explicit_url_that_answers(embedded_server: EmbeddedValkey) -> None:
    resolved = resolve(RedisSettings(url=embedded_server.url))
    assert resolved == ResolvedRedis(embedded_server.url)


def test_resolve_uses_the_default_url_when_it_answers(
    embedded_server: EmbeddedValkey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "DEFAULT_REDIS_URL", embedded_server.url)
    resolved = resolve(RedisSettings())
    assert resolved.url == embedded_server.url
    assert resolved.embedded is None


def test_resolve_starts_an_embedded_server_when_nothing_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "DEFAULT_REDIS_URL", _unused_url())
    resolved = resolve(RedisSettings(connect_timeout_s=0.5))
    try:
        assert resolved.embedded is not None
        pid = resolved.embedded.pid
        assert resolved.url == resolved.embedded.url
        assert answers(resolved.url)
    finally:
        resolved.close()
    assert resolved.embedded is None
    assert pid is not None and not _running(pid)
    assert not answers(resolved.url, 0.5)
    resolved.close()  # idempotent


def test_resolve_without_embedded_fails_when_nothing_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "DEFAULT_REDIS_URL", _unused_url())
    with pytest.raises(ConnectionFailed, match="embedded servers are disabled"):
        resolve(RedisSettings(embedded=False, connect_timeout_s=0.5))
