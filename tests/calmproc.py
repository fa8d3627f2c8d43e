"""Runs ``calm up`` as a real process tree for end-to-end tests, and talks to it with a raw client."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

READY_MARK = "CALM ready"


@dataclass
class CalmProcess:
    proc: subprocess.Popen[str]
    url: str
    prefix: str
    output: list[str] = field(default_factory=list)

    def status(self) -> dict:
        out = subprocess.run(
            [sys.executable, "-m", "calm", "status", "--json"], capture_output=True, text=True, timeout=60,
            env={**os.environ, "CALM_REDIS_URL": self.url, "CALM_PREFIX": self.prefix},
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


def _pump(proc: subprocess.Popen[str], sink: list[str], ready: threading.Event) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        sink.append(line.rstrip())
        if READY_MARK in line:
            ready.set()


@contextlib.contextmanager
def calm_up(url: str, prefix: str, fleet: Path, *args: str, ready_timeout_s: float = 180.0,
            env: dict[str, str] | None = None) -> Iterator[CalmProcess]:
    """Start ``calm up`` and wait for its ready line; SIGTERM it at the end and check it stopped cleanly."""
    full_env = {**os.environ, "CALM_REDIS_URL": url, "CALM_PREFIX": prefix, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "calm", "up", "--fleet", str(fleet), *args], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=full_env, start_new_session=True,
    )
    output: list[str] = []
    ready = threading.Event()
    threading.Thread(target=_pump, args=(proc, output, ready), daemon=True).start()
    handle = CalmProcess(proc, url, prefix, output)
    try:
        if not ready.wait(ready_timeout_s):
            raise AssertionError("calm up did not become ready:\n" + "\n".join(output[-60:]))
        yield handle
    except BaseException:
        print("---- calm up output (tail) ----\n" + "\n".join(output[-300:]))
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
                raise AssertionError("calm up did not stop on SIGTERM:\n" + "\n".join(output[-60:])) from None
        if proc.stdout is not None:
            proc.stdout.close()


def send(client: redis.Redis, prefix: str, **fields: str) -> str:
    return client.xadd(f"{prefix}queries", fields).decode()


def collect(client: redis.Redis, stream: str, ids: set[str], timeout_s: float = 120.0) -> dict[str, list[dict]]:
    """Every reply on ``stream`` (grouped by id) until all ``ids`` have one or the guard expires."""
    got: dict[str, list[dict]] = {}
    cursor = "0-0"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not ids <= set(got):
        rows = client.xread({stream: cursor}, count=500, block=500) or []
        for _, items in rows:
            for entry_id, fields in items:
                cursor = entry_id
                reply = {k.decode(): v.decode() for k, v in fields.items()}
                got.setdefault(reply["id"], []).append(reply)
    return got
