"""Clients from `broker.connection.client` pack commands in C (hiredis) with redis-py's semantics."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.exceptions import DataError

from broker.config import RedisSettings
from broker.connection import client


async def test_values_of_every_type_round_trip(redis_url: str, prefix: str) -> None:
    c = client(redis_url, RedisSettings(url=redis_url))
    assert c.connection_pool.connection_class.__module__ == "broker.connection"  # not redis-py's own
    plain = aioredis.Redis.from_url(redis_url)
    key = f"{prefix}packing"
    try:
        fields = {"s": "héllo wörld", "b": b"\x00\xff raw", "i": 42, "f": 0.25, "m": memoryview(b"view"),
                  "ba": bytearray(b"array"), "spaces": "a b c"}
        await c.hset(key, mapping=fields)  # type: ignore[arg-type]
        stored = await plain.hgetall(key)
        assert stored == {b"s": "héllo wörld".encode(), b"b": b"\x00\xff raw", b"i": b"42", b"f": b"0.25",
                          b"m": b"view", b"ba": b"array", b"spaces": b"a b c"}
        assert await c.execute_command("CONFIG GET", "maxmemory")  # a command name of two words
        entry = await c.xadd(f"{key}:s", {"k": "v"}, maxlen=10, approximate=True)
        assert (await plain.xrange(f"{key}:s"))[0] == (entry, {b"k": b"v"})
        with pytest.raises(DataError):
            await c.set(key, None)  # type: ignore[arg-type]
    finally:
        await plain.delete(key, f"{key}:s")
        await c.aclose()
        await plain.aclose()
