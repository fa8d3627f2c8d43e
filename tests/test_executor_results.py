"""The executor answers a success it dispatched from its own record, and everything else from Redis's."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.codec import decode_as, encode, plain_fields
from broker.config import Settings
from broker.effects import Effects, Entry
from broker.messages import Decision, Inflight, Planned, Query, Result, Work
from broker.runtime import ProcessRuntime
from calm_actors.cache import CACHED_FIELDS, exact_hit
from calm_actors.executor import Executor
from workers.engine_api import Generation
from workers.fleet.spec import load_fleet
from workers.worker import Worker


@pytest.fixture
async def runtimes(settings: Settings, redis_url: str) -> AsyncIterator[list[ProcessRuntime]]:
    made: list[ProcessRuntime] = []

    def make() -> ProcessRuntime:
        made.append(ProcessRuntime("executor", settings, redis_url, instance=f"test-executor-{len(made)}"))
        return made[-1]

    yield [make(), make()]
    for rt in made:
        await rt.client.aclose()


class CountingHmget:
    """Counts the executor's reads of the in-flight hash."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.real = client.hmget
        self.calls = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return await self.real(*args, **kwargs)


async def _apply(client: aioredis.Redis, effects: Sequence[Effects]) -> None:
    pipe = client.pipeline(transaction=True)
    for e in effects:
        for op in e.ops:
            op(pipe)
    await pipe.execute()


def _planned(query_id: str, reply_to: str) -> Entry:
    query = Query(id=query_id, entry_id="1-0", prompt="12+7=", reply_to=reply_to, max_new_tokens=4,
                  arrived_ms=1.0)
    decision = Decision(model="arith", reason="test", fallbacks=["generalist"])
    return Entry("execute", "1-0", encode(Planned(query=query, decision=decision, domain="arithmetic")))


def _result(query_id: str, attempt: int, ok: bool, model: str = "arith") -> Entry:
    result = Result(id=query_id, attempt=attempt, model=model, worker="w1", ok=ok, text="19" if ok else "",
                    error="" if ok else "boom", tokens_out=2)
    return Entry("results", f"{attempt}-0", encode(result))


async def _replies(client: aioredis.Redis, stream: str) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in await client.xrange(stream)]


async def _dispatch_counting_reads(rt: ProcessRuntime, monkeypatch: pytest.MonkeyPatch,
                                   query_id: str) -> tuple[Executor, CountingHmget, str]:
    """An executor whose reads of the in-flight hash are counted, after it dispatched ``query_id``."""
    executor = Executor(rt)
    reads = CountingHmget(rt.client)
    monkeypatch.setattr(rt.client, "hmget", reads)
    reply_to = f"{rt.names.prefix}test-replies"
    await _apply(rt.client, await executor.on_planned_batch([_planned(query_id, reply_to)]))
    return executor, reads, reply_to


async def test_a_success_it_dispatched_needs_no_read_of_the_inflight_hash(
        runtimes: list[ProcessRuntime], monkeypatch: pytest.MonkeyPatch) -> None:
    rt = runtimes[0]
    executor, reads, reply_to = await _dispatch_counting_reads(rt, monkeypatch, "q1")
    assert await rt.client.hexists(rt.names.inflight_data, "q1")  # the shared record is written all the same
    await _apply(rt.client, await executor.on_results([_result("q1", 1, ok=True)]))
    assert reads.calls == 0
    (reply,) = await _replies(rt.client, reply_to)
    assert reply["id"] == "q1" and reply["status"] == "ok" and reply["text"] == "19" and reply["attempts"] == "1"
    assert reply["domain"] == "arithmetic" and reply["reason"] == "test"
    assert not await rt.client.hexists(rt.names.inflight_data, "q1")
    assert await rt.client.zscore(rt.names.inflight, "q1") is None
    # A duplicate of the result: the record is gone here and in Redis, so nothing more is sent.
    await _apply(rt.client, await executor.on_results([_result("q1", 1, ok=True)]))
    assert reads.calls == 1 and len(await _replies(rt.client, reply_to)) == 1


async def test_another_executors_dispatch_is_finished_from_the_shared_record(runtimes: list[ProcessRuntime]) -> None:
    first, second = Executor(runtimes[0]), Executor(runtimes[1])
    reply_to = f"{runtimes[0].names.prefix}test-replies"
    await _apply(first.rt.client, await first.on_planned_batch([_planned("q2", reply_to)]))
    await _apply(second.rt.client, await second.on_results([_result("q2", 1, ok=True)]))
    (reply,) = await _replies(second.rt.client, reply_to)
    assert reply["id"] == "q2" and reply["text"] == "19"
    # The dispatcher's own copy answers too, but the delivery is idempotent per query id: still one reply.
    await _apply(first.rt.client, await first.on_results([_result("q2", 1, ok=True)]))
    assert len(await _replies(first.rt.client, reply_to)) == 1


async def test_a_failure_reads_the_shared_record_and_retries_the_fallback(
        runtimes: list[ProcessRuntime], monkeypatch: pytest.MonkeyPatch) -> None:
    rt = runtimes[0]
    executor, reads, reply_to = await _dispatch_counting_reads(rt, monkeypatch, "q3")
    await _apply(rt.client, await executor.on_results([_result("q3", 1, ok=False)]))
    assert reads.calls == 1  # a retry must see the latest attempt, which only Redis is sure to hold
    ((_, fields),) = await rt.client.xrange(rt.names.work("generalist"))
    work = decode_as(Work, fields)
    assert work.id == "q3" and work.attempt == 2
    stored = decode_as(Inflight, {b"m": await rt.client.hget(rt.names.inflight_data, "q3")})
    assert stored.attempt == 2
    await _apply(rt.client, await executor.on_results([_result("q3", 2, ok=True, model="generalist")]))
    assert reads.calls == 1  # the retry was this executor's too
    (reply,) = await _replies(rt.client, reply_to)
    assert reply["model"] == "generalist" and reply["attempts"] == "2"


async def test_old_records_are_forgotten(runtimes: list[ProcessRuntime]) -> None:
    executor = Executor(runtimes[0])
    reply_to = f"{runtimes[0].names.prefix}test-replies"
    await _apply(executor.rt.client, await executor.on_planned_batch([_planned("q4", reply_to)]))
    dispatched = executor._dispatched["q4"].dispatched_ms
    executor._forget_older_than(dispatched)  # dispatched at the cut-off: kept
    assert "q4" in executor._dispatched
    executor._forget_older_than(dispatched + 1)
    assert "q4" not in executor._dispatched


GENERATION = Generation(text="19", tokens_in=5, tokens_out=2, confidence=0.9, inference_ms=3.0,
                        finish_reason="eos", cpu_s=0.001)


async def _work_served_by_a_worker(rt: ProcessRuntime, executor: Executor, tiny_fleet: Path, query_id: str,
                                   reply_to: str) -> tuple[Work, Entry]:
    """Dispatch ``query_id``, let a worker (no engine needed) finish its work, apply its effects; (work, result)."""
    await _apply(rt.client, await executor.on_planned_batch([_planned(query_id, reply_to)]))
    ((_, fields),) = await rt.client.xrange(rt.names.work("arith"))
    work = decode_as(Work, fields)
    worker_rt = ProcessRuntime("worker", rt.settings, rt.url, instance="w1")
    try:
        worker = Worker(worker_rt, load_fleet(tiny_fleet), engine_factory=lambda card, fleet: None)  # type: ignore[arg-type, return-value]
        effects = worker._outcome_effects(work, 0.5, {"ok": True, "gen": GENERATION, "energy_j": 0.01})
        await _apply(rt.client, [effects])
    finally:
        await worker_rt.client.aclose()
    ((entry_id, result_fields),) = await rt.client.xrange(rt.names.results)
    return work, Entry("results", entry_id.decode(), result_fields)


async def test_a_worker_delivers_the_reply_the_executor_would_have_sent(runtimes: list[ProcessRuntime],
                                                                        tiny_fleet: Path) -> None:
    rt = runtimes[0]
    executor = Executor(rt)
    reply_to = f"{rt.names.prefix}test-replies"
    work, result = await _work_served_by_a_worker(rt, executor, tiny_fleet, "q5", reply_to)
    assert work.reply_to == reply_to and work.reply and work.arrived_ms == 1.0
    (reply,) = await _replies(rt.client, reply_to)
    own = plain_fields(executor._reply(executor._dispatched["q5"], decode_as(Result, result.fields)))
    assert reply.keys() == own.keys()
    assert {k: v for k, v in reply.items() if k != "latency_ms"} == {k: v for k, v in own.items() if k != "latency_ms"}
    assert reply["text"] == "19" and reply["worker"] == "w1" and reply["domain"] == "arithmetic"
    # The exact cache's entry is written in the reply's transaction: a repeat sent on seeing the reply hits it.
    key = executor.cache.exact_key(executor._dispatched["q5"].query)
    assert key is not None
    entry = exact_hit(await rt.client.get(key)).reply
    typed = executor._reply(executor._dispatched["q5"], decode_as(Result, result.fields))
    assert entry == {k: typed[k] for k in CACHED_FIELDS if k in typed}  # what the executor's store writes
    assert entry["text"] == "19" and entry["domain"] == "arithmetic"
    # The executor still finishes the query on the result (in-flight record gone) and sends nothing more.
    await _apply(rt.client, await executor.on_results([result]))
    assert len(await _replies(rt.client, reply_to)) == 1
    assert not await rt.client.hexists(rt.names.inflight_data, "q5")


async def test_with_worker_replies_off_the_executor_replies(settings: Settings, redis_url: str,
                                                            tiny_fleet: Path) -> None:
    rt = ProcessRuntime("executor", settings.replace({"executor.worker_replies": False}), redis_url,
                        instance="test-executor-off")
    try:
        executor = Executor(rt)
        reply_to = f"{rt.names.prefix}test-replies-off"
        work, result = await _work_served_by_a_worker(rt, executor, tiny_fleet, "q6", reply_to)
        assert work.reply_to == "" and work.reply == b""
        assert await _replies(rt.client, reply_to) == []
        await _apply(rt.client, await executor.on_results([result]))
        (reply,) = await _replies(rt.client, reply_to)
        assert reply["id"] == "q6" and reply["text"] == "19" and reply["worker"] == "w1"
    finally:
        await rt.client.aclose()


def test_unreadable_reply_fields_leave_the_reply_to_the_executor() -> None:
    work = Work(id="q7", attempt=1, model="arith", prompt="1+1=", max_new_tokens=4, temperature=0.0,
                dispatched_ms=1.0, reply_to="calm:replies", reply=b"\xc1", arrived_ms=1.0)
    result = Result(id="q7", attempt=1, model="arith", worker="w1", ok=True, text="2")
    assert Worker._reply(work, result, 5.0) is None
    listed = Work(id="q7", attempt=1, model="arith", prompt="1+1=", max_new_tokens=4, temperature=0.0,
                  dispatched_ms=1.0, reply_to="calm:replies", reply=b"\x91\x01", arrived_ms=1.0)  # [1]: not a map
    assert Worker._reply(listed, result, 5.0) is None
    template = Work(id="q7", attempt=1, model="arith", prompt="1+1=", max_new_tokens=4, temperature=0.0,
                    dispatched_ms=1.0, reply_to="calm:replies", reply=b"\x81\xa2id\xa2q7", arrived_ms=1.0)
    reply = Worker._reply(template, result, 5.0)
    assert reply is not None and reply["id"] == "q7" and reply["text"] == "2" and reply["latency_ms"] == 4.0
