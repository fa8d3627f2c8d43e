"""Retention: consumed streams drop what every group acknowledged (after a grace period), never the rest."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from broker.names import Names
from broker.retention import consumed_bound, trim_acknowledged


async def _ids(client: aioredis.Redis, stream: str) -> list[str]:
    return [i.decode() for i, _ in await client.xrange(stream)]


async def test_only_entries_every_group_acknowledged_are_trimmed(aclient: aioredis.Redis, names: Names) -> None:
    stream = f"{names.prefix}in"
    ids = [(await aclient.xadd(stream, {"n": str(i)})).decode() for i in range(10)]
    await aclient.xgroup_create(stream, "fast", id="0")
    await aclient.xgroup_create(stream, "slow", id="0")
    assert await trim_acknowledged(aclient, stream, retain_s=0) == 0, "nothing delivered yet"
    fast = await aclient.xreadgroup("fast", "c", {stream: ">"}, count=10)
    await aclient.xack(stream, "fast", *[i for i, _ in fast[0][1]])
    slow = await aclient.xreadgroup("slow", "c", {stream: ">"}, count=6)
    await aclient.xack(stream, "slow", *[i for i, _ in slow[0][1]][:3])  # entries 3-5 stay pending
    assert await consumed_bound(aclient, stream) == ids[3]
    assert await trim_acknowledged(aclient, stream, retain_s=0) == 3
    assert await _ids(aclient, stream) == ids[3:], "pending and undelivered entries are kept"
    await aclient.xack(stream, "slow", *ids[3:6])
    assert await consumed_bound(aclient, stream) == ids[5], "the last delivered id bounds an idle group"
    await trim_acknowledged(aclient, stream, retain_s=0)
    assert await _ids(aclient, stream) == ids[5:]


async def test_recent_acknowledged_entries_are_kept_for_the_grace_period(aclient: aioredis.Redis,
                                                                        names: Names) -> None:
    stream = f"{names.prefix}in"
    await aclient.xgroup_create(stream, "g", id="0", mkstream=True)
    ids = [(await aclient.xadd(stream, {"n": str(i)})).decode() for i in range(4)]
    read = await aclient.xreadgroup("g", "c", {stream: ">"}, count=10)
    await aclient.xack(stream, "g", *[i for i, _ in read[0][1]])
    assert await trim_acknowledged(aclient, stream, retain_s=3600) == 0
    later = time.time() * 1000 + 7200 * 1000
    assert await trim_acknowledged(aclient, stream, retain_s=3600, now_ms=later) == 3
    assert await _ids(aclient, stream) == ids[3:]


async def test_a_stream_without_groups_is_left_alone(aclient: aioredis.Redis, names: Names) -> None:
    stream = f"{names.prefix}plain"
    await aclient.xadd(stream, {"n": "1"})
    assert await trim_acknowledged(aclient, stream, retain_s=0) == 0
    assert await aclient.xlen(stream) == 1
