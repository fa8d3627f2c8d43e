"""Scale-out, as the compose topology runs it but as processes: several workers with the same config
share one model's work, and the gateway's replies name every one of them.

Throughput figures (1 vs 2 workers, side by side) come from ``python -m tests.bench_gateway scale``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from broker.config import GatewaySettings, Settings
from calm.gateway.app import build_app
from tests.calmproc import CalmProcess, calm_up

pytestmark = pytest.mark.slow
FAST = ("--set=streams.reclaim_idle_ms=1500", "--set=streams.reclaim_interval_ms=300",
        "--set=executor.attempt_timeout_s=30", "--set=scheduler.worker_timeout_s=4")
MODEL_DELAY_MS = 100  # every generation also waits this long: the workload is bound by the model, not the CPU


def specialist(fleet: Path, domain: str = "arithmetic") -> str:
    from workers.fleet.spec import load_fleet

    return next(m.name for m in load_fleet(fleet).models if domain in m.domains and not m.baseline)


@contextmanager
def fleet_of(workers: int, fleet: Path, url: str, prefix: str, model: str) -> Iterator[CalmProcess]:
    """``calm up`` with ``workers`` identical workers, each preloading ``model``."""
    with calm_up(url, prefix, fleet, "--workers", str(workers), f"--set=worker.preload={model}",
                 f"--set=worker.inject_delay_ms={MODEL_DELAY_MS}", *FAST) as calm:
        yield calm


@asynccontextmanager
async def gateway(settings: Settings, url: str) -> AsyncIterator[str]:
    settings = dataclasses.replace(settings, gateway=GatewaySettings(timeout_s=120.0, max_inflight=1024))
    server = TestServer(build_app(settings, url), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def metric(http: aiohttp.ClientSession, base: str, name: str, **labels: str) -> float:
    async with http.get(f"{base}/metrics") as r:
        text = await r.text()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


async def wait_replicas(http: aiohttp.ClientSession, base: str, model: str, n: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while await metric(http, base, "calm_model_replicas", model=model) < n:
        assert time.monotonic() < deadline, f"{model} not loaded on {n} workers"
        await asyncio.sleep(0.2)


async def pinned_burst(http: aiohttp.ClientSession, base: str, model: str, n: int) -> list[dict]:
    """``n`` concurrent completions pinned to ``model``; returns each reply's ``calm`` object."""
    async def one(i: int) -> dict:
        body = {"model": model, "prompt": f"{i % 50}+{i % 7}=", "max_tokens": 4}
        async with http.post(f"{base}/v1/completions", json=body, headers={"Idempotency-Key": f"burst-{i}"}) as r:
            data = await r.json()
            assert r.status == 200, data
            return dict(data["calm"])

    return await asyncio.gather(*(one(i) for i in range(n)))


async def test_workers_with_the_same_config_share_one_models_work(tiny_fleet: Path, redis_url: str, prefix: str,
                                                                  settings: Settings) -> None:
    model = specialist(tiny_fleet)
    host = socket.gethostname()
    with fleet_of(2, tiny_fleet, redis_url, prefix, model) as calm:
        async with gateway(settings, redis_url) as base, aiohttp.ClientSession() as http:
            await wait_replicas(http, base, model, 2)
            replies = await pinned_burst(http, base, model, 24)
            inferences = {w: await metric(http, base, "calm_inferences_total", model=model, worker=w)
                          for w in (f"{host}-w1", f"{host}-w2")}
        status = calm.status()
    assert {r["model"] for r in replies} == {model}
    assert {r["status"] for r in replies} == {"ok"}
    served_by = {r["worker"] for r in replies}
    assert served_by == {f"{host}-w1", f"{host}-w2"}, f"replies name both workers, got {served_by}"
    assert all(n > 0 for n in inferences.values()), inferences
    assert sorted(status["loaded"][model]) == [f"{host}-w1", f"{host}-w2"]
