"""Chaos: the broker itself crashes under load (SIGKILL) and comes back from its fsync'd append-only file.

Every query whose XADD the server acknowledged must get exactly one reply; the actors and workers ride out
the outage on their clients' retries instead of exiting.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from broker.embedded import EmbeddedValkey
from tests.calmproc import calm_up, collect

pytestmark = pytest.mark.slow
SETTINGS = ("--set=streams.reclaim_idle_ms=1500", "--set=streams.reclaim_interval_ms=300",
            "--set=executor.attempt_timeout_s=15")
OUTAGE_S = 2.0
RESTARTS = 2


def test_every_acknowledged_query_is_answered_once_across_broker_crashes(tiny_fleet: Path, tmp_path: Path,
                                                                           prefix: str) -> None:
    data = tmp_path / "valkey"
    server = EmbeddedValkey(data_dir=data).start()
    port = server.port
    accepted: list[str] = []
    refused = 0
    stop = threading.Event()

    def load() -> None:
        """~10 queries/s; an id counts as sent once the server acknowledged its XADD (else it is retried)."""
        nonlocal refused
        client = redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=2, retry=Retry(NoBackoff(), 0))
        i = 0
        while not stop.is_set():
            qid = f"aof-{i}"
            prompt = f"sort {i % 10} {(i // 10) % 10} 4 =" if i % 3 == 0 else f"{i % 90}+{i % 7}="
            try:
                client.xadd(f"{prefix}queries", {"prompt": prompt, "id": qid, "max_new_tokens": "6"})
            except (redis.ConnectionError, redis.TimeoutError):
                refused += 1
                time.sleep(0.1)
                continue  # the same id again: a client that retries until the broker acknowledges
            accepted.append(qid)
            i += 1
            time.sleep(0.1)
        client.close()

    try:
        with calm_up(server.url, prefix, tiny_fleet, *SETTINGS) as calm:
            before = {a["pid"] for a in calm.status()["actors"].values()}
            thread = threading.Thread(target=load, daemon=True)
            thread.start()
            at_crash = []
            try:
                for _ in range(RESTARTS):
                    time.sleep(3.0)
                    assert server.pid is not None
                    at_crash.append(len(accepted))
                    os.kill(server.pid, signal.SIGKILL)  # no shutdown: only what the AOF fsync'd survives
                    server.stop()
                    time.sleep(OUTAGE_S)
                    server = EmbeddedValkey(port=port, data_dir=data).start()
                time.sleep(3.0)
            finally:
                stop.set()
                thread.join()
            client = redis.Redis.from_url(server.url)
            got = collect(client, f"{prefix}replies", set(accepted), timeout_s=180)
            after = {a["pid"] for a in calm.status()["actors"].values()}
            client.close()
    finally:
        server.stop()
    print(f"broker crashes: {RESTARTS}; accepted {len(accepted)} queries (at each crash: {at_crash}), "
          f"{refused} XADDs refused while it was down; replied {len(got)}")
    missing = set(accepted) - set(got)
    assert not missing, f"lost {len(missing)}/{len(accepted)}: {sorted(missing)[:10]}"
    doubled = [k for k in accepted if len(got[k]) != 1]
    assert not doubled, f"answered more than once: {doubled[:10]}"
    assert all(got[k][0]["status"] == "ok" for k in accepted), [got[k][0] for k in accepted
                                                               if got[k][0]["status"] != "ok"][:3]
    assert refused > 0, "queries were sent while the broker was down"
    crashes = [line for line in calm.output if "exited with" in line or "Traceback" in line or "Error" in line]
    assert before == after, "every actor and worker rode out the outages:\n" + "\n".join(crashes[-40:])
