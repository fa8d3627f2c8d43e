"""Reliability on the live system: idempotent ids, load shedding, broker connection drops."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from broker.embedded import EmbeddedValkey
from tests.calmproc import calm_up, collect, send

pytestmark = pytest.mark.slow
FAST = ("--set=streams.reclaim_idle_ms=1500", "--set=executor.attempt_timeout_s=20")


def test_the_same_id_runs_once_and_every_sender_gets_the_reply(tiny_fleet: Path, redis_url: str,
                                                                prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with calm_up(redis_url, prefix, tiny_fleet, *FAST):
        pipe = client.pipeline(transaction=False)  # both copies in flight together
        pipe.xadd(f"{prefix}queries", {"prompt": "23+19=", "id": "dup-1", "reply_to": f"{prefix}replies:a"})
        pipe.xadd(f"{prefix}queries", {"prompt": "23+19=", "id": "dup-1", "reply_to": f"{prefix}replies:b"})
        pipe.execute()
        a = collect(client, f"{prefix}replies:a", {"dup-1"})
        b = collect(client, f"{prefix}replies:b", {"dup-1"})
        time.sleep(1.0)
        later = {"prompt": "23+19=", "id": "dup-1", "reply_to": f"{prefix}replies:c"}
        client.xadd(f"{prefix}queries", later)
        c = collect(client, f"{prefix}replies:c", {"dup-1"})
        requests = sum(int(client.hget(f"{prefix}model:{m}", "requests") or 0)
                       for m in ("arith", "sort", "generalist"))
    assert len(a["dup-1"]) == len(b["dup-1"]) == len(c["dup-1"]) == 1
    assert a["dup-1"][0]["text"] == b["dup-1"][0]["text"] == c["dup-1"][0]["text"]
    assert a["dup-1"][0]["status"] == "ok"
    assert requests == 1, "the model ran once for three copies of one id"


def test_overload_is_shed_with_an_explicit_rejection(tiny_fleet: Path, redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with calm_up(redis_url, prefix, tiny_fleet, *FAST, "--set=planner.max_queue_per_model=3",
                 "--set=planner.route_to_baseline=true"):
        for model in ("arith", "sort", "generalist"):
            client.hset(f"{prefix}faults:{model}", mapping={"delay_ms": "300"})
        time.sleep(1.5)
        ids = {send(client, prefix, prompt=f"{i}+{i + 1}=", id=f"burst-{i}", max_new_tokens="4") and f"burst-{i}"
               for i in range(40)}
        got = collect(client, f"{prefix}replies", ids, timeout_s=120)
    assert set(got) == ids and all(len(v) == 1 for v in got.values())
    statuses = [v[0]["status"] for v in got.values()]
    shed = [v[0] for v in got.values() if v[0]["status"] == "rejected"]
    assert shed, "some of the burst was shed"
    assert all(r["error"].startswith("overloaded") for r in shed)
    assert statuses.count("ok") >= 3, "work within capacity was served"


def test_dropped_broker_connections_lose_nothing(tiny_fleet: Path, embedded_server: EmbeddedValkey,
                                                prefix: str) -> None:
    """On the private embedded server, so CLIENT KILL touches nobody else's connections."""
    redis_url = embedded_server.url
    client = redis.Redis.from_url(redis_url)
    with calm_up(redis_url, prefix, tiny_fleet, *FAST) as calm:
        pids = {a["pid"] for a in calm.status()["actors"].values()}
        ids = set()
        for i in range(30):
            ids.add(send(client, prefix, prompt=f"{i}+7=", id=f"drop-{i}", max_new_tokens="4") and f"drop-{i}")
            if i in (10, 20):
                # Kill every other client connection of the server (ours is spared: SKIPME yes is the default).
                client.execute_command("CLIENT", "KILL", "TYPE", "normal")
            time.sleep(0.05)
        got = collect(client, f"{prefix}replies", ids, timeout_s=120)
        after = {a["pid"] for a in calm.status()["actors"].values()}
    assert ids <= set(got), f"lost: {sorted(ids - set(got))}"
    assert all(len(got[i]) == 1 and got[i][0]["status"] == "ok" for i in ids)
    assert pids == after, "actors reconnected instead of crashing"
