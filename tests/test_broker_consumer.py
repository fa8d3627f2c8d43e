"""The consumer abstraction against a real server: ack with effects, reclaim, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest
import redis.asyncio as aioredis

from broker.config import Settings
from broker.consumer import ConsumerSpec, StreamConsumer, wake_readers
from broker.effects import Effects, Entry
from broker.errors import DecodeError
from broker.names import Names


async def _run_until(consumer: StreamConsumer, predicate, timeout_s: float = 20.0) -> None:
    task = asyncio.create_task(consumer.run())
    try:
        async with asyncio.timeout(timeout_s):
            while not await predicate():  # noqa: ASYNC110 - polls state in Redis, no event to wait on
                await asyncio.sleep(0.02)
    finally:
        consumer.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)


def _consumer(client: aioredis.Redis, names: Names, settings: Settings, name: str, handler) -> StreamConsumer:
    spec = ConsumerSpec(stream=f"{names.prefix}in", group="g", consumer=name, actor="test")
    return StreamConsumer(client, client, spec, names, settings.streams, handler=handler)


async def test_effects_are_written_with_the_ack(aclient: aioredis.Redis, names: Names, settings: Settings) -> None:
    stream = f"{names.prefix}in"
    out = f"{names.prefix}out"
    for i in range(10):
        await aclient.xadd(stream, {"n": str(i)})

    async def handler(entry: Entry) -> Effects:
        return Effects().xadd(out, {"double": str(2 * int(entry.fields[b"n"]))})

    consumer = _consumer(aclient, names, settings, "c1", handler)

    async def done() -> bool:
        return await aclient.xlen(out) == 10

    await _run_until(consumer, done)
    doubled = sorted(int(f[b"double"]) for _, f in await aclient.xrange(out))
    assert doubled == [2 * i for i in range(10)]
    pending = await aclient.xpending(stream, "g")
    assert pending["pending"] == 0


async def test_entries_of_a_dead_consumer_are_reclaimed_and_processed_once(
    aclient: aioredis.Redis, names: Names, settings: Settings
) -> None:
    stream = f"{names.prefix}in"
    out = f"{names.prefix}out"
    await aclient.xgroup_create(stream, "g", id="0", mkstream=True)
    for i in range(5):
        await aclient.xadd(stream, {"n": str(i)})
    # A consumer reads everything and dies before acking.
    await aclient.xreadgroup("g", "dead-one", {stream: ">"}, count=100)

    async def handler(entry: Entry) -> Effects:
        return Effects().xadd(out, {"n": entry.fields[b"n"]})

    survivor = _consumer(aclient, names, settings, "survivor", handler)

    async def done() -> bool:
        return await aclient.xlen(out) >= 5

    await _run_until(survivor, done)
    await asyncio.sleep(0.5)  # give a duplicate the chance to show up
    seen = [int(f[b"n"]) for _, f in await aclient.xrange(out)]
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert (await aclient.xpending(stream, "g"))["pending"] == 0


async def test_poison_entry_goes_to_dead_letters_after_the_delivery_limit(
    aclient: aioredis.Redis, names: Names, settings: Settings
) -> None:
    stream = f"{names.prefix}in"
    await aclient.xadd(stream, {"n": "boom"})
    await aclient.xadd(stream, {"n": "1"})
    calls = {"boom": 0}

    async def handler(entry: Entry) -> Effects:
        if entry.fields[b"n"] == b"boom":
            calls["boom"] += 1
            raise RuntimeError("handler crashed")
        return Effects()

    consumer = _consumer(aclient, names, settings, "c1", handler)

    async def dead() -> bool:
        return await aclient.xlen(names.dead) >= 1

    await _run_until(consumer, dead, timeout_s=30)
    [(_, fields)] = await aclient.xrange(names.dead)
    assert fields[b"stream"].decode() == stream
    assert b"delivered more than 3 times" in fields[b"reason"]
    assert b"boom" in fields[b"payload"]
    assert calls["boom"] == settings.streams.max_deliveries
    assert (await aclient.xpending(stream, "g"))["pending"] == 0


async def test_decode_errors_dead_letter_at_once(aclient: aioredis.Redis, names: Names, settings: Settings) -> None:
    stream = f"{names.prefix}in"
    await aclient.xadd(stream, {"m": b"\xc1garbage"})

    async def handler(entry: Entry) -> Effects:
        raise DecodeError("bad message payload: test", entry.id, entry.stream)

    consumer = _consumer(aclient, names, settings, "c1", handler)

    async def dead() -> bool:
        return await aclient.xlen(names.dead) == 1

    await _run_until(consumer, dead)
    [(_, fields)] = await aclient.xrange(names.dead)
    assert fields[b"reason"] == b"bad message payload: test"
    assert fields[b"actor"] == b"test"


async def test_a_commit_survives_a_server_that_lost_its_scripts(aclient: aioredis.Redis, names: Names,
                                                                settings: Settings, monkeypatch) -> None:
    """A restarted server has no Lua scripts: redis-py replays the transaction after reconnecting without
    reloading them (NOSCRIPT). The consumer runs the batch again instead of dying, and the effect lands."""
    from redis.asyncio.client import Pipeline

    stream, key = f"{names.prefix}in", f"{names.prefix}scripted"
    script = aclient.register_script("redis.call('SET', KEYS[1], ARGV[1]) return 1")
    await aclient.xadd(stream, {"n": "7"})
    original = Pipeline.load_scripts
    flushed: list[bool] = []

    async def load_then_lose(self: Pipeline) -> None:  # the server restarts right after the scripts were loaded
        await original(self)
        if not flushed:
            flushed.append(True)
            await aclient.script_flush()

    monkeypatch.setattr(Pipeline, "load_scripts", load_then_lose)

    def set_by_script(pipe: Pipeline, value: str) -> None:
        pipe.scripts.add(script)  # type: ignore[arg-type]
        pipe.evalsha(script.sha, 1, key, value)

    async def handler(entry: Entry) -> Effects:
        return Effects().call(lambda p: set_by_script(p, entry.fields[b"n"].decode()))

    consumer = _consumer(aclient, names, settings, "c1", handler)

    async def done() -> bool:
        return await aclient.get(key) == b"7" and (await aclient.xpending(stream, "g"))["pending"] == 0

    await _run_until(consumer, done)
    assert flushed, "the first commit ran against a server without the script"


@pytest.mark.parametrize("count", [1, 3])
async def test_wake_ends_blocked_reads_at_once_and_delivers_nothing(
    aclient: aioredis.Redis, redis_url: str, names: Names, settings: Settings, count: int
) -> None:
    from broker.connection import client as make_client

    handled: list[str] = []

    async def handler(entry: Entry) -> Effects:
        handled.append(entry.id)
        return Effects()

    consumers, readers, tasks, streams = [], [], [], []
    for i in range(count):
        streams.append(stream := f"{names.prefix}wake{i}")
        name = f"calm-test-wake-{uuid.uuid4().hex[:8]}"
        readers.append(reader := make_client(redis_url, settings.redis, blocking=True, name=name))
        spec = ConsumerSpec(stream=stream, group="g", consumer="c1", actor="test")
        # Reads that block for ten minutes: only the wake can end the consumers within the guard below.
        consumers.append(consumer := StreamConsumer(reader, aclient, spec, names, settings.streams, handler=handler,
                                                    block_ms=600_000, reader_name=name))
        tasks.append(asyncio.create_task(consumer.run()))
    wanted = {c.reader_name for c in consumers}
    try:
        for _ in range(200):  # until every reader is blocked in its XREADGROUP
            clients = await aclient.client_list()
            if wanted <= {c.get("name") for c in clients if "xreadgroup" in str(c.get("cmd", ""))}:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the readers never blocked: {clients}")
        for consumer in consumers:
            consumer.stop()
        if count == 1:
            await consumers[0].wake()
        else:
            await wake_readers(aclient, consumers)  # all at once, as a process's shutdown does
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)  # a guard against a hang, not a measurement
        for stream in streams:
            await aclient.xadd(stream, {"after": "stop"})
            groups = await aclient.xinfo_groups(stream)
            assert [(g["pending"], g["lag"]) for g in groups] == [(0, 1)]  # nothing delivered to a stopped consumer
        assert handled == []
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for reader in readers:
            await reader.aclose()
