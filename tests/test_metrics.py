"""``GET /metrics``: Prometheus text that prometheus-client's own parser reads, with the system's numbers."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from broker.codec import encode
from broker.config import GatewaySettings, Settings
from broker.consumer import ensure_group
from broker.effects import Entry, dead_letter_fields
from broker.messages import WorkerEvent
from calm.gateway.app import build_app
from calm.gateway.events import reason_class
from tests.gatewaystub import WORKER, StubPipeline, running_stub

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
async def base(aclient: aioredis.Redis, settings: Settings, redis_url: str) -> AsyncIterator[tuple[str, StubPipeline]]:
    settings = dataclasses.replace(settings, gateway=GatewaySettings(timeout_s=5.0))
    async with running_stub(aclient, settings) as stub:
        server = TestServer(build_app(settings, redis_url), host="127.0.0.1")
        await server.start_server()
        try:
            yield str(server.make_url("")).rstrip("/"), stub
        finally:
            await server.close()


async def scrape(http: aiohttp.ClientSession, base: str) -> tuple[Samples, dict[str, str]]:
    async with http.get(f"{base}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await r.text()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


async def test_metrics_cover_requests_latency_energy_queues_workers_and_dead_letters(
        base: tuple[str, StubPipeline], aclient: aioredis.Redis) -> None:
    url, stub = base
    names = stub.names
    # Things the rest of the system does while the gateway runs: a worker evicts and loads, a message
    # dead-letters twice with different numbers in its reason, and work waits for a model.
    await aclient.xadd(names.sched, encode(WorkerEvent(worker=WORKER, event="evicted", model="sort", detail="lru")))
    await aclient.xadd(names.sched, encode(WorkerEvent(worker=WORKER, event="loaded", model="sort", detail="0.2s")))
    for size in (40000, 50000):
        entry = Entry(names.queries, "1-0", {b"prompt": b"x"})
        await aclient.xadd(names.dead, dead_letter_fields(entry, f"prompt is {size} bytes, over the limit", "monitor"))
    await ensure_group(aclient, names.work("generalist"), "workers")
    for _ in range(3):
        await aclient.xadd(names.work("generalist"), {"m": b"queued"})
    async with aiohttp.ClientSession() as http:
        bodies = [{"model": "calm", "prompt": "1+1="}, {"model": "calm", "prompt": "sort 3 1 ="},
                  {"model": "calm", "prompt": "cached:2+2="}, {"model": "arith", "prompt": "4+4="}]
        for body in bodies:
            async with http.post(f"{url}/v1/completions", json=body) as r:
                assert r.status == 200
        async with http.post(f"{url}/v1/completions", json={"model": "calm", "prompt": ""}) as r:
            assert r.status == 400
        async with http.post(f"{url}/v1/completions", json={"model": "calm", "prompt": "flood"}) as r:
            assert r.status == 429 and r.headers["Retry-After"] == "1"
        async with http.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "1"}) as r:
            assert r.status == 404
        for _ in range(50):  # the event tail folds entries in the background
            samples, types = await scrape(http, url)
            if total(samples, "calm_dead_letters_total") >= 2 and total(samples, "calm_inferences_total") >= 3:
                break
            await asyncio.sleep(0.1)

    # the gateway's own counts
    assert value(samples, "calm_gateway_requests_total", endpoint="completions", model="calm", code="200") == 3
    assert value(samples, "calm_gateway_requests_total", endpoint="completions", model="arith", code="200") == 1
    assert value(samples, "calm_gateway_requests_total", endpoint="completions", model="calm", code="400") == 1
    assert value(samples, "calm_gateway_requests_total", endpoint="completions", model="other", code="404") == 1
    assert value(samples, "calm_gateway_replies_total", model="arith", status="ok") == 3
    assert value(samples, "calm_gateway_replies_total", model="sort", status="ok") == 1
    assert value(samples, "calm_gateway_replies_total", model="-", status="rejected") == 1
    assert types["calm_gateway_reply_latency_seconds"] == "histogram"
    assert value(samples, "calm_gateway_reply_latency_seconds_count", model="arith") == 3
    assert value(samples, "calm_gateway_reply_latency_seconds_sum", model="arith") == pytest.approx(3 * 0.0075)
    assert value(samples, "calm_gateway_route_seconds_bucket", model="sort", le="0.0025") == 1  # route_ms 1.25
    assert value(samples, "calm_gateway_cache_hits_total", kind="exact") == 1
    # from the event streams: energy by model and meter, tokens, loads, evictions, dead letters by reason
    assert value(samples, "calm_inferences_total", model="arith", worker=WORKER, ok="true") == 2
    assert value(samples, "calm_energy_joules_total", model="arith", source="estimate") == pytest.approx(0.04)
    assert value(samples, "calm_tokens_total", model="sort", direction="out") > 0
    assert value(samples, "calm_model_loads_total", model="sort", worker=WORKER) == 1
    assert value(samples, "calm_model_evictions_total", model="sort", worker=WORKER) == 1
    reason = reason_class("prompt is 40000 bytes, over the limit")
    assert value(samples, "calm_dead_letters_total", actor="monitor", reason=reason) == 2
    assert value(samples, "calm_route_decisions_total", model="arith", domain="arithmetic") == 3
    # from the knowledge base and the streams at scrape time
    assert value(samples, "calm_kb_up") == 1
    assert value(samples, "calm_model_requests_total", model="arith") == 2  # the stub's QoS records (no cache hit)
    assert value(samples, "calm_model_loaded", model="arith", worker=WORKER) == 1
    assert value(samples, "calm_model_replicas", model="generalist") == 0
    assert value(samples, "calm_work_queue_depth", model="generalist") == 3
    assert value(samples, "calm_worker_up", worker=WORKER, device="cpu", type="onnx") == 1
    assert value(samples, "calm_worker_models_loaded", worker=WORKER) == 2
    assert value(samples, "calm_worker_memory_budget_bytes", worker=WORKER) == 100 * 2**20
    assert value(samples, "calm_actor_instances", role="monitor") == 1
    assert value(samples, "calm_actor_instances", role="planner") == 0
    assert value(samples, "calm_stream_length", stream=names.dead) == 2
    assert value(samples, "calm_cache_hits_total", kind="exact") == 1
    assert value(samples, "calm_events_total", event="shed_overloaded") == 1
    assert types["calm_model_latency_ewma_seconds"] == "gauge"


def test_dead_letter_reasons_become_bounded_labels() -> None:
    assert reason_class("unknown model 'gpt-9'") == reason_class("unknown model 'x'") == "unknown model _"
    assert reason_class("field 'max_new_tokens' must be an integer in 1..1024, got 0") == \
        "field _ must be an integer in N..N, got N"
    assert reason_class("bad message payload: Expected `str`, got `int`") == "bad message payload"
