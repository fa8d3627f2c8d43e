"""Chaos: SIGKILL every kind of process in turn under steady load; every query still gets exactly one reply."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import redis

from tests.calmproc import calm_up, collect, send

pytestmark = pytest.mark.slow
SETTINGS = ("--workers", "2", "--set=streams.reclaim_idle_ms=1500", "--set=streams.reclaim_interval_ms=300",
            "--set=executor.attempt_timeout_s=15", "--set=scheduler.worker_timeout_s=4")
ROLES = ("monitor", "analyzer", "planner", "executor", "scheduler", "worker")


def test_sigkill_each_process_kind_under_load(tiny_fleet: Path, redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    sent: list[str] = []
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            prompt = f"sort {i % 10} {(i // 10) % 10} {(i // 100) % 10} =" if i % 3 == 0 else f"{i}+{i % 9}="
            send(client, prefix, prompt=prompt, id=f"chaos-{i}", max_new_tokens="6")
            sent.append(f"chaos-{i}")
            i += 1
            time.sleep(0.05)  # ~20 queries/s

    thread = threading.Thread(target=load, daemon=True)
    recovered: dict[str, float] = {}
    with calm_up(redis_url, prefix, tiny_fleet, *SETTINGS) as calm:
        thread.start()
        try:
            for role in ROLES:
                time.sleep(1.5)
                before = calm.status()
                victims = [a["pid"] for a in before["actors"].values() if a["role"] == role]
                assert victims, f"no {role} running"
                killed_at = time.monotonic()
                os.kill(victims[0], signal.SIGKILL)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    now = [a for a in calm.status()["actors"].values() if a["role"] == role]
                    if now and victims[0] not in {a["pid"] for a in now} and len(now) >= len(victims):
                        break
                    time.sleep(0.2)
                recovered[role] = round(time.monotonic() - killed_at, 2)
                assert role in recovered
        finally:
            stop.set()
            thread.join()
        got = collect(client, f"{prefix}replies", set(sent), timeout_s=180)
    print(f"recovery seconds by role: {recovered}; {len(sent)} queries")
    missing = set(sent) - set(got)
    assert not missing, f"lost {len(missing)}/{len(sent)}: {sorted(missing)[:10]}"
    doubled = [k for k in sent if len(got[k]) != 1]
    assert not doubled, f"answered more than once: {doubled[:10]}"
    assert all(got[k][0]["status"] == "ok" for k in sent), [got[k][0] for k in sent if got[k][0]["status"] != "ok"][:3]
