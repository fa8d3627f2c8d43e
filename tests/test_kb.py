"""The knowledge base on a real server: model cards, QoS EWMA and windows, loaded sets, workers, actors, demand."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import redis.asyncio as aioredis

from broker.config import Settings
from broker.kb import KnowledgeBase, WorkerState
from broker.names import Names

CARD = {
    "description": "solves arithmetic word problems",
    "examples": ["what is 2+2?", "a train leaves at 3pm..."],
    "domains": ["math", "reasoning"],
    "prompt_template": "Q: {prompt}\nA:",
    "params": 1_500_000,
    "memory_mb": 350.5,
    "source": "hf:tiny/math",
    "baseline": True,
    "quality": {"math": 0.8, "chat": 0.2},
    "eos_token": "</s>",
}


async def _run(kb: KnowledgeBase, *ops) -> list:
    pipe = kb.client.pipeline(transaction=True)
    for op in ops:
        op(pipe)
    return await pipe.execute()


async def test_register_model_round_trips_the_card(aclient: aioredis.Redis, names: Names) -> None:
    kb = KnowledgeBase(aclient, names)
    await _run(kb, lambda p: kb.register_model(p, "tiny-math", CARD),
               lambda p: kb.register_model(p, "tiny-chat", {"description": "small talk"}))
    models = await kb.models()
    assert sorted(models) == ["tiny-chat", "tiny-math"]
    m = models["tiny-math"]
    assert m.description == CARD["description"]
    assert m.examples == tuple(CARD["examples"])
    assert m.domains == ("math", "reasoning")
    assert m.domain == "math"
    assert m.prompt_template == "Q: {prompt}\nA:"
    assert m.params == 1_500_000
    assert m.memory_mb == 350.5
    assert m.source == "hf:tiny/math"
    assert m.baseline is True
    assert m.quality == {"math": 0.8, "chat": 0.2}
    assert m.latency_ms is None and m.requests == 0 and m.loaded_on == ()
    chat = models["tiny-chat"]
    assert chat.baseline is False
    assert chat.domains == () and chat.domain == "tiny-chat"
    assert chat.prompt_template == "{prompt}"
    # the contract: a plain hash readable with HGETALL
    raw = await aclient.hgetall(names.model("tiny-math"))
    assert raw[b"name"] == b"tiny-math"
    assert raw[b"description"] == CARD["description"].encode()
    assert raw[b"baseline"] == b"1"
    assert raw[b"eos_token"] == b"</s>"
    assert await kb.model_names() == ["tiny-chat", "tiny-math"]
    assert await kb.version() == 2


async def test_reregistering_a_card_keeps_live_qos(aclient: aioredis.Redis, names: Names) -> None:
    kb = KnowledgeBase(aclient, names)
    await _run(kb, lambda p: kb.register_model(p, "m", {"description": "old"}))
    await _run(kb, lambda p: kb.record_qos(p, "m", 0.5, {"latency_ms": 100.0}, True, 10))
    await _run(kb, lambda p: kb.register_model(p, "m", {"description": "new"}))
    m = (await kb.models())["m"]
    assert m.description == "new"
    assert m.latency_ms == 100.0
    assert m.requests == 1


async def test_models_is_empty_without_registrations(aclient: aioredis.Redis, names: Names) -> None:
    kb = KnowledgeBase(aclient, names)
    assert await kb.models() == {}
    assert await kb.workers() == {}
    assert await kb.actors() == []
    assert await kb.version() == 0


async def test_record_qos_ewma_and_windows(aclient: aioredis.Redis, names: Names, settings: Settings) -> None:
    qos = dataclasses.replace(settings.qos, window=3)
    alpha = qos.ewma_alpha
    kb = KnowledgeBase(aclient, names)
    await _run(kb, lambda p: kb.register_model(p, "m", {"description": "d"}))
    samples = [
        ({"latency_ms": 100.0, "energy_j": 1.0, "confidence": 0.9, "tokens_per_s": 50.0}, True),
        ({"latency_ms": 200.0, "energy_j": 3.0, "confidence": 0.5, "tokens_per_s": 30.0}, False),
        ({"latency_ms": 50.0, "energy_j": 2.0, "confidence": 0.7, "tokens_per_s": 40.0}, True),
        ({"latency_ms": 80.0, "energy_j": 1.5, "confidence": 0.6, "tokens_per_s": 45.0}, False),
        ({"latency_ms": 120.0, "energy_j": 2.5, "confidence": 0.8, "tokens_per_s": 35.0}, True),
    ]
    expected: dict[str, float] = {}
    for values, ok in samples:
        await _run(kb, lambda p, v=values, o=ok: kb.record_qos(p, "m", alpha, v, o, qos.window))
        for key, x in values.items():
            expected[key] = x if key not in expected else expected[key] + alpha * (x - expected[key])
    m = (await kb.models())["m"]
    assert m.latency_ms == pytest.approx(expected["latency_ms"], rel=1e-9)
    assert m.energy_j == pytest.approx(expected["energy_j"], rel=1e-9)
    assert m.confidence == pytest.approx(expected["confidence"], rel=1e-9)
    assert m.tokens_per_s == pytest.approx(expected["tokens_per_s"], rel=1e-9)
    assert m.requests == 5
    assert m.errors == 2
    window = await aclient.lrange(names.window("m", "latency_ms"), 0, -1)
    assert [float(x) for x in window] == [120.0, 80.0, 50.0]  # newest first, trimmed to 3
    assert await aclient.llen(names.window("m", "confidence")) == 3
    assert await aclient.exists(names.window("m", "tokens_per_s")) == 0  # no window for other metrics


async def test_record_qos_first_update_seeds_the_average(aclient: aioredis.Redis, names: Names) -> None:
    kb = KnowledgeBase(aclient, names)
    await _run(kb, lambda p: kb.record_qos(p, "m", 0.2, {"latency_ms": 100.0}, True, 5))
    raw = await aclient.hget(names.model("m"), "latency_ms")
    assert float(raw) == 100.0
    await _run(kb, lambda p: kb.record_qos(p, "m", 0.2, {"latency_ms": 200.0}, True, 5))
    assert float(await aclient.hget(names.model("m"), "latency_ms")) == pytest.approx(120.0)


async def test_set_load_time_is_an_ewma(aclient: aioredis.Redis, names: Names) -> None:
    kb = KnowledgeBase(aclient, names)
    await _run(kb, lambda p: kb.register_model(p, "m", {}))
    await _run(kb, lambda p: kb.set_load_time(p, "m", 2.0, 0.5))
    await _run(kb, lambda p: kb.set_load_time(p, "m", 4.0, 0.5))
    assert (await kb.models())["m"].load_s == pytest.approx(3.0)


async def test_set_loaded_mirrors_the_set_into_loaded_on(aclient: aioredis.Redis, names: Names) -> None:
    kb = KnowledgeBase(aclient, names)
    await _run(kb, lambda p: kb.register_model(p, "m", {}))
    v0 = await kb.version()
    await _run(kb, lambda p: kb.set_loaded(p, "m", "w2", True), lambda p: kb.set_loaded(p, "m", "w1", True))
    assert (await kb.models())["m"].loaded_on == ("w1", "w2")
    assert await aclient.hget(names.model("m"), "loaded_on") == b"w1,w2"
    await _run(kb, lambda p: kb.set_loaded(p, "m", "w1", True))  # idempotent
    assert (await kb.models())["m"].loaded_on == ("w1", "w2")
    await _run(kb, lambda p: kb.set_loaded(p, "m", "w1", False))
    assert (await kb.models())["m"].loaded_on == ("w2",)
    await _run(kb, lambda p: kb.set_loaded(p, "m", "w2", False))
    assert (await kb.models())["m"].loaded_on == ()
    assert await aclient.smembers(f"{names.model('m')}:loaded") == set()
    assert await kb.version() == v0 + 5  # one bump per set_loaded


def _worker(**kw) -> WorkerState:
    base = {"id": "w1", "type": "onnx", "device": "cpu", "pid": 4321, "host": "box", "memory_budget_mb": 2048.0,
            "memory_used_mb": 350.0, "models_loaded": ("a",), "models_servable": ("a", "b")}
    base.update(kw)
    return WorkerState(**base)


async def test_register_worker_heartbeat_and_workers(aclient: aioredis.Redis, names: Names) -> None:
    kb = KnowledgeBase(aclient, names)
    before_ms = time.time() * 1000
    await _run(kb, lambda p: kb.register_worker(p, _worker(), ttl_s=30),
               lambda p: kb.register_worker(p, _worker(id="w2", device="cuda", models_loaded=()), ttl_s=30))
    workers = await kb.workers()
    assert sorted(workers) == ["w1", "w2"]
    w1 = workers["w1"]
    assert (w1.type, w1.device, w1.pid, w1.host) == ("onnx", "cpu", 4321, "box")
    assert w1.memory_budget_mb == 2048.0 and w1.memory_used_mb == 350.0
    assert w1.models_loaded == ("a",) and w1.models_servable == ("a", "b")
    assert w1.state == "up" and w1.last_used == {}
    assert w1.heartbeat_ms >= before_ms - 1
    assert workers["w2"].device == "cuda"
    assert 0 < await aclient.pttl(names.worker_alive("w1")) <= 30_000

    await _run(kb, lambda p: kb.heartbeat(p, "w1", 5, memory_used_mb=700.25, models_loaded=["a", "b"],
                                          last_used={"a": 1000.0, "b": 2000.5}, inflight=3, state="draining"))
    w1 = (await kb.workers())["w1"]
    assert w1.memory_used_mb == 700.25
    assert w1.models_loaded == ("a", "b")
    assert w1.last_used == {"a": 1000.0, "b": 2000.5}
    assert w1.inflight == 3
    assert w1.state == "draining"
    assert w1.models_servable == ("a", "b")  # untouched by the heartbeat
    assert 0 < await aclient.pttl(names.worker_alive("w1")) <= 5_000


def test_worker_alive() -> None:
    w = _worker(heartbeat_ms=1_000_000.0)
    assert w.alive(1_000_000.0, 10)
    assert w.alive(1_010_000.0, 10)
    assert not w.alive(1_010_001.0, 10)
    assert not dataclasses.replace(w, state="stopped").alive(1_000_000.0, 10)


async def test_remove_worker(aclient: aioredis.Redis, names: Names) -> None:
    kb = KnowledgeBase(aclient, names)
    await _run(
        kb,
        lambda p: kb.register_worker(p, _worker(id="w1"), 30),
        lambda p: kb.register_worker(p, _worker(id="w2"), 30),
        lambda p: kb.set_loaded(p, "a", "w1", True),
        lambda p: kb.set_loaded(p, "a", "w2", True),
        lambda p: kb.set_loaded(p, "b", "w1", True),
    )
    await _run(kb, lambda p: kb.remove_worker(p, "w1", ["a", "b"]))
    assert sorted(await kb.workers()) == ["w2"]
    assert await aclient.exists(names.worker("w1"), names.worker_alive("w1")) == 0
    assert await aclient.hget(names.model("a"), "loaded_on") == b"w2"
    assert await aclient.hget(names.model("b"), "loaded_on") == b""


async def test_actors_drops_expired_heartbeats(aclient: aioredis.Redis, names: Names) -> None:
    kb = KnowledgeBase(aclient, names)
    await _run(kb, lambda p: kb.actor_heartbeat(p, "planner", "p1", 111, 30, strategy="utility"),
               lambda p: kb.actor_heartbeat(p, "monitor", "m1", 222, 0.001))
    short = names.actor("monitor", "m1")
    await asyncio.sleep(0.02)  # well past the 1 ms TTL; Redis expires keys on access by its own clock
    assert await aclient.exists(short) == 0
    actors = await kb.actors()
    assert actors == [
        {"role": "planner", "instance": "p1", "pid": "111", "heartbeat_ms": actors[0]["heartbeat_ms"],
         "strategy": "utility"}
    ]
    assert float(actors[0]["heartbeat_ms"]) > 0
    assert await aclient.smembers(names.actors) == {b"planner:p1"}  # the stale member is pruned
    assert 0 < await aclient.pttl(names.actor("planner", "p1")) <= 30_000


async def test_record_demand_buckets(aclient: aioredis.Redis, names: Names) -> None:
    kb = KnowledgeBase(aclient, names)
    await _run(
        kb,
        lambda p: kb.record_demand(p, "a", 1000.0),
        lambda p: kb.record_demand(p, "a", 1009.99),
        lambda p: kb.record_demand(p, "a", 1010.0),
        lambda p: kb.record_demand(p, "b", 1000.0, bucket_s=60, keep_s=120),
    )
    demand = await kb.demand(["a", "b", "never"])
    assert demand == {"a": {100: 2, 101: 1}, "b": {16: 1}, "never": {}}
    assert 0 < await aclient.ttl(names.demand("a")) <= 3600
    assert 0 < await aclient.ttl(names.demand("b")) <= 120
    await _run(kb, lambda p: kb.record_demand(p, "code", 1000.0, domain="code"),
               lambda p: kb.record_demand(p, "generalist", 1010.0, domain="code"))
    # A model and a domain may share a name; both come back in one round trip, each under its own.
    own, by_domain = await kb.demand_and_domains(["a", "code"], ["code", "none"])
    assert own == {"a": {100: 2, 101: 1}, "code": {100: 1}}
    assert by_domain == {"code": {100: 1, 101: 1}, "none": {}}


async def test_exemplars_live_beside_the_card_and_change_its_digest(aclient: aioredis.Redis, names: Names) -> None:
    kb = KnowledgeBase(aclient, names)
    await _run(kb, lambda p: kb.register_model(p, "m", {**CARD, "exemplars": ["1+2=", "30+4="]}))
    first = (await kb.models())["m"]
    assert await kb.exemplars("m") == ["1+2=", "30+4="]
    assert first.exemplars_digest and first.examples == tuple(CARD["examples"])
    assert b"exemplars" not in await aclient.hgetall(names.model("m")), "the hash stays small"
    await _run(kb, lambda p: kb.register_model(p, "m", {**CARD, "exemplars": ["5+5="]}))
    assert (await kb.models())["m"].exemplars_digest not in ("", first.exemplars_digest)
    await _run(kb, lambda p: kb.register_model(p, "m", CARD))
    assert (await kb.models())["m"].exemplars_digest == "" and await kb.exemplars("m") == []


async def test_profiles_are_stored_apart_and_read_in_one_call(aclient: aioredis.Redis, names: Names) -> None:
    kb = KnowledgeBase(aclient, names)
    await _run(kb, lambda p: kb.register_model(p, "a", CARD), lambda p: kb.register_model(p, "b", CARD),
               lambda p: kb.set_profile(p, "a", b"\x00" * 16, 2, "d1"))
    states = await kb.models()
    assert (states["a"].profile_rows, states["a"].profile_digest) == (2, "d1")
    assert states["b"].profile_rows == 0
    assert await kb.profiles(["a", "b"]) == {"a": b"\x00" * 16}
