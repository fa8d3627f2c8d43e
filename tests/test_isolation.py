"""Process-per-model isolation (``worker.isolation = "process"``) on the tiny fleet."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.codec import decode, encode
from broker.config import Settings, WorkerSettings, load_settings
from broker.effects import Entry
from broker.errors import ConfigError
from broker.messages import Result, Work, WorkerEvent
from broker.runtime import ProcessRuntime
from workers.engine import OnnxCausalLM
from workers.errors import EngineError, WorkerError
from workers.fleet.spec import Fleet, load_fleet
from workers.isolated import IsolatedEngine, private_bytes
from workers.worker import Worker

pytestmark = pytest.mark.slow  # uses the built tiny fleet and spawns engine processes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def fleet(tiny_fleet: Path) -> Fleet:
    return load_fleet(tiny_fleet)


@pytest.fixture
async def worker(settings: Settings, redis_url: str, fleet: Fleet, aclient: aioredis.Redis) -> AsyncIterator[Worker]:
    """A registered worker in isolation mode, driven directly (its consumers are created but not run)."""
    iso = dataclasses.replace(settings, worker=WorkerSettings(isolation="process", worker_id="iso-w1"))
    rt = ProcessRuntime("worker", iso, redis_url, instance="iso-w1")
    w = Worker(rt, fleet)
    await w.start()
    yield w
    await w.stop()
    rt.stopping.set()  # ends the heartbeat and reaper loops
    await asyncio.sleep(0)
    await rt.client.aclose()


async def _events(client: aioredis.Redis, worker: Worker) -> list[WorkerEvent]:
    rows: Any = await client.xrange(worker.names.sched)
    return [m for _, f in rows if isinstance(m := decode(f), WorkerEvent)]


def test_the_setting_follows_the_config_conventions() -> None:
    assert load_settings(env={}).worker.isolation == "none"
    assert load_settings(env={"CALM_WORKER_ISOLATION": "process"}).worker.isolation == "process"
    assert load_settings(env={}, overrides={"worker.isolation": "process"}).worker.isolation == "process"
    with pytest.raises(ConfigError, match="isolation"):
        load_settings(env={}, overrides={"worker.isolation": "thread"})


def test_greedy_output_equals_the_in_process_engine(fleet: Fleet) -> None:
    for card in fleet.models:
        local = OnnxCausalLM.load(fleet.model_dir(card), name=card.name, eos_token=card.eos_token)
        isolated = IsolatedEngine.start(card, fleet, WorkerSettings())
        try:
            assert isolated.device == local.device == "cpu"
            prompts = [card.render(p) for p in card.examples]
            for prompt in prompts:
                a = isolated.generate(prompt, max_new_tokens=12)
                b = local.generate(prompt, max_new_tokens=12)
                assert (a.text, a.tokens_in, a.tokens_out, a.finish_reason, a.confidence) == \
                    (b.text, b.tokens_in, b.tokens_out, b.finish_reason, b.confidence), (card.name, prompt)
            sampled = [e.generate(prompts[0], max_new_tokens=8, temperature=0.9, seed=3).text
                       for e in (isolated, local)]
            assert sampled[0] == sampled[1]
            with pytest.raises(EngineError, match="max_new_tokens"):  # the child's errors come back as EngineError
                isolated.generate(prompts[0], max_new_tokens=-1)
            assert isolated.generate(prompts[0], max_new_tokens=2).tokens_out >= 1  # and it keeps serving
        finally:
            isolated.close()
            local.close()
        with pytest.raises(EngineError, match="closed"):
            isolated.generate("x", max_new_tokens=1)


def test_a_load_failure_in_the_child_is_an_engine_load_error(fleet: Fleet) -> None:
    broken = WorkerSettings(engine="no_such_module:factory")
    with pytest.raises(EngineError, match="no_such_module"):
        IsolatedEngine.start(fleet.models[0], fleet, broken)


async def test_eviction_kills_the_child_and_reports_the_memory_it_returned(
        worker: Worker, aclient: aioredis.Redis) -> None:
    assert await worker.load("arith", reason="test")
    hosted = worker.hosted["arith"]
    engine = hosted.engine
    assert isinstance(engine, IsolatedEngine)
    pid = engine.pid
    assert pid != os.getpid() and _alive(pid)
    assert hosted.memory_mb == pytest.approx(engine.memory_bytes / 2**20)
    assert engine.memory_bytes == pytest.approx(private_bytes(pid), rel=0.25)  # the child's own pages
    await worker.heartbeat()
    before = (await worker.rt.kb.workers())["iso-w1"]
    assert before.memory_used_mb == pytest.approx(hosted.memory_mb, abs=0.1)
    assert before.models_loaded == ("arith",)

    await worker.evict("arith", reason="test eviction")

    assert not _alive(pid), "eviction kills the engine process"
    assert engine.freed_bytes > 0
    evicted = [e for e in await _events(aclient, worker) if e.event == "evicted" and e.model == "arith"]
    assert len(evicted) == 1
    assert evicted[0].memory_mb == pytest.approx(engine.freed_bytes / 2**20)  # measured just before the kill
    after = (await worker.rt.kb.workers())["iso-w1"]
    assert after.memory_used_mb == 0.0 and after.models_loaded == ()
    assert (await worker.rt.kb.models())["arith"].loaded_on == ()


async def test_a_crashed_child_fails_its_request_and_the_model_is_reported_unloaded(
        worker: Worker, aclient: aioredis.Redis) -> None:
    assert await worker.load("arith", reason="test")
    engine = worker.hosted["arith"].engine
    assert isinstance(engine, IsolatedEngine)
    os.kill(engine.pid, signal.SIGKILL)
    work = Work(id="q-crash", attempt=1, model="arith", prompt="1+2=", max_new_tokens=4, temperature=0.0,
                dispatched_ms=0.0)
    effects = await worker.serve("arith", Entry(worker.names.work("arith"), "1-0", encode(work)))
    pipe = aclient.pipeline(transaction=False)
    for op in effects.ops:
        op(pipe)
    await pipe.execute()
    rows: Any = await aclient.xrange(worker.names.results)
    result = decode(rows[-1][1])
    assert isinstance(result, Result) and not result.ok
    assert "engine process" in result.error and "SIGKILL" in result.error, result.error

    await worker.reap_dead_engines()  # also started by serve; awaiting it again is harmless
    assert "arith" not in worker.hosted
    died = [e for e in await _events(aclient, worker) if e.event == "evicted" and e.model == "arith"]
    assert died and died[-1].detail == "engine process died"
    assert (await worker.rt.kb.models())["arith"].loaded_on == ()

    assert await worker.load("arith", reason="reload"), "the worker survives and loads the model again"
    reloaded = worker.hosted["arith"].engine
    assert reloaded.generate(worker.cards["arith"].render("1+2="), max_new_tokens=4).tokens_out >= 1


def test_an_engine_factory_object_cannot_be_isolated(settings: Settings, redis_url: str, fleet: Fleet) -> None:
    iso = dataclasses.replace(settings, worker=WorkerSettings(isolation="process"))
    with pytest.raises(WorkerError, match=r"worker\.engine"):
        Worker(ProcessRuntime("worker", iso, redis_url), fleet, engine_factory=lambda card, fleet: None)  # type: ignore[arg-type, return-value]
