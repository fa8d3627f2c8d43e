"""Workers attach and leave at run time, under load: routing follows, and no query is lost."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.calmproc import calm_up, collect, send

pytestmark = pytest.mark.slow
SETTINGS = ("--set=worker.models=arith,generalist", "--set=scheduler.worker_timeout_s=3",
            "--set=executor.attempt_timeout_s=6", "--set=streams.reclaim_idle_ms=1500")


def start_worker(url: str, prefix: str, fleet: Path, worker_id: str) -> subprocess.Popen[str]:
    env = {**os.environ, "CALM_REDIS_URL": url, "CALM_PREFIX": prefix, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "calm", "worker", "--fleet", str(fleet), "--models", "sort", "--id", worker_id,
         "--type", "onnx-late", "--set=scheduler.worker_timeout_s=3"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("CALM-READY"), line
    return proc


@contextlib.contextmanager
def _reaped(procs: list[subprocess.Popen[str]]) -> Iterator[None]:
    """Kill whatever worker a failing test left behind, and close its pipe."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


class Load:
    """Sorting and arithmetic queries at a steady rate from a background thread."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client, self.prefix = client, prefix
        self.sent: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            # Distinct prompts, so replies come from models and not from the response cache.
            prompt = f"sort {i % 10} {(i // 10) % 10} {(i // 100) % 10} =" if i % 2 else f"{i}+{i % 7}="
            send(self.client, self.prefix, prompt=prompt, id=f"load-{i}", max_new_tokens="6")
            self.sent.append(f"load-{i}")
            i += 1
            time.sleep(0.1)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def sort_models_since(client: redis.Redis, stream: str, since_ms: float) -> list[str]:
    rows = client.xrange(stream, min=f"{int(since_ms)}-0")
    return [f[b"model"].decode() for _, f in rows
            if f.get(b"domain") == b"sorting" and f.get(b"status") == b"ok" and f.get(b"cached") == b"0"]


def test_a_new_worker_type_joins_and_leaves_under_load(tiny_fleet: Path, redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    replies = f"{prefix}replies"
    load = Load(client, prefix)
    workers: list[subprocess.Popen[str]] = []
    with calm_up(redis_url, prefix, tiny_fleet, *SETTINGS) as calm, _reaped(workers):
        load.start()
        time.sleep(2)
        assert "sort" not in calm.status()["loaded"] or not calm.status()["loaded"]["sort"]
        joined_ms = time.time() * 1000
        late = start_worker(redis_url, prefix, tiny_fleet, "late-1")
        workers.append(late)
        deadline = time.time() + 30
        while time.time() < deadline and "sort" not in sort_models_since(client, replies, joined_ms):
            time.sleep(0.2)
        assert "sort" in sort_models_since(client, replies, joined_ms), "the new worker's model gets traffic"
        status = calm.status()
        assert status["workers"]["late-1"]["type"] == "onnx-late"

        late.send_signal(signal.SIGTERM)  # a clean stop: it deregisters at once
        assert late.wait(timeout=30) == 0
        assert "late-1" not in calm.status()["workers"]

        crash = start_worker(redis_url, prefix, tiny_fleet, "late-2")
        workers.append(crash)
        time.sleep(3)
        crash.kill()  # a crash: the scheduler notices the missed heartbeats
        crash.wait(timeout=10)
        deadline = time.time() + 30
        while time.time() < deadline and "late-2" in calm.status()["workers"]:
            time.sleep(0.5)
        assert "late-2" not in calm.status()["workers"], "a crashed worker is removed"
        load.stop()
        got = collect(client, replies, set(load.sent), timeout_s=120)
    missing = set(load.sent) - set(got)
    assert not missing, f"lost {len(missing)} of {len(load.sent)}: {sorted(missing)[:5]}"
    assert all(len(got[i]) == 1 for i in load.sent), "exactly one reply each"
    assert all(got[i][0]["status"] == "ok" for i in load.sent), [got[i][0] for i in load.sent
                                                                  if got[i][0]["status"] != "ok"][:3]
