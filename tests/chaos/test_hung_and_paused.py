"""Chaos without crashes: a worker that hangs (SIGSTOP) and a server that pauses (CLIENT PAUSE)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker.embedded import EmbeddedValkey
from tests.calmproc import calm_up, collect, send

pytestmark = pytest.mark.slow
HUNG = ("--workers", "2", "--set=executor.attempt_timeout_s=4", "--set=executor.max_attempts=3",
        "--set=streams.reclaim_idle_ms=1500", "--set=streams.reclaim_interval_ms=300",
        "--set=scheduler.worker_timeout_s=3")


@contextlib.contextmanager
def stopped(*pids: int) -> Iterator[None]:
    """SIGSTOP ``pids`` (they hang: alive, silent), and always SIGCONT them afterwards."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _dead_reasons(client: redis.Redis, prefix: str) -> list[str]:
    return [f[b"reason"].decode() for _, f in client.xrange(f"{prefix}dead")]


def test_a_hung_worker_is_routed_around_and_exhausted_attempts_are_dead_lettered(
        tiny_fleet: Path, redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with calm_up(redis_url, prefix, tiny_fleet, *HUNG) as calm:
        workers = {wid: {**w, "id": wid} for wid, w in calm.status()["workers"].items()}
        assert len(workers) == 2
        victim = max(workers.values(), key=lambda w: len(w["models_loaded"]))
        survivor = next(w for w in workers.values() if w["id"] != victim["id"])
        ids = set()
        with stopped(victim["pid"]):
            for i in range(16):
                ids.add(send(client, prefix, prompt=f"{i}+{i % 7}=", id=f"hung-{i}", max_new_tokens="4")
                        and f"hung-{i}")
                time.sleep(0.1)
            got = collect(client, f"{prefix}replies", ids, timeout_s=120)
        assert ids <= set(got), f"lost: {sorted(ids - set(got))}"
        assert all(len(got[i]) == 1 for i in ids), "one reply each"
        assert all(got[i][0]["status"] == "ok" and got[i][0]["worker"] == survivor["id"] for i in ids), \
            [got[i][0] for i in ids]

        # Every worker hangs: attempts run out, the query is answered with the reason and dead-lettered.
        with stopped(*(w["pid"] for w in workers.values())):
            send(client, prefix, prompt="98+97=", id="nobody", max_new_tokens="4")
            answer = collect(client, f"{prefix}replies", {"nobody"}, timeout_s=120)["nobody"]
        assert answer[0]["status"] == "error" and "after 3 attempts" in answer[0]["error"], answer
        assert any("after 3 attempts" in r for r in _dead_reasons(client, prefix))
        time.sleep(3.0)  # the workers resume and finish the stale attempts: no second reply
        again = collect(client, f"{prefix}replies", {"nobody"}, timeout_s=1)
        assert len(again.get("nobody", [])) == 1, again
        send(client, prefix, prompt="88+91=", id="after", max_new_tokens="4")
        assert collect(client, f"{prefix}replies", {"after"}, timeout_s=60)["after"][0]["status"] == "ok"


def test_a_paused_server_loses_nothing(tiny_fleet: Path, embedded_server: EmbeddedValkey, prefix: str) -> None:
    """CLIENT PAUSE on the private server: every connection stalls for a while, then carries on."""
    client = redis.Redis.from_url(embedded_server.url)
    admin = redis.Redis.from_url(embedded_server.url)
    with calm_up(embedded_server.url, prefix, tiny_fleet, "--set=streams.reclaim_idle_ms=1500") as calm:
        pids = {a["pid"] for a in calm.status()["actors"].values()}
        ids = set()
        for i in range(30):
            if i in (10, 20):
                admin.execute_command("CLIENT", "PAUSE", "1500", "ALL")
            ids.add(send(client, prefix, prompt=f"{i}+3=", id=f"pause-{i}", max_new_tokens="4") and f"pause-{i}")
            time.sleep(0.05)
        got = collect(client, f"{prefix}replies", ids, timeout_s=120)
        after = {a["pid"] for a in calm.status()["actors"].values()}
    assert ids <= set(got), f"lost: {sorted(ids - set(got))}"
    assert all(len(got[i]) == 1 and got[i][0]["status"] == "ok" for i in ids)
    assert pids == after, "no process crashed while the server was paused"
