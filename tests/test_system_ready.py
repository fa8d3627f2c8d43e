"""``wait_routable``: the system is handed over only once it routes as it will from then on."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis.asyncio as aioredis

from broker.config import Settings
from broker.kb import KnowledgeBase, WorkerState
from broker.names import Names
from calm.status import wait_routable


async def _fleet(kb: KnowledgeBase) -> None:
    """Two profiled specialists and a profiled baseline on one registered worker; no classifier yet."""
    pipe = kb.client.pipeline(transaction=True)
    for name, baseline in (("arith", False), ("sort", False), ("generalist", True)):
        kb.register_model(pipe, name, {"description": name, "baseline": "1" if baseline else "0"})
        kb.set_profile(pipe, name, np.eye(2, 4, dtype=np.float32).tobytes(), 2, f"d-{name}")
    kb.register_worker(pipe, WorkerState(id="w1", models_servable=("arith", "sort", "generalist")), ttl_s=60)
    await pipe.execute()


async def _store_classifier(kb: KnowledgeBase, models: list[str]) -> None:
    pipe = kb.client.pipeline(transaction=True)
    kb.set_classifier(pipe, "c1", models, b"blob", now_ms=0)
    await pipe.execute()


async def test_profiled_models_without_the_domain_classifier_are_not_ready(
    settings: Settings, redis_url: str, aclient: aioredis.Redis, names: Names
) -> None:
    kb = KnowledgeBase(aclient, names)
    await _fleet(kb)
    assert {n for n, s in (await kb.models()).items() if s.baseline} == {"generalist"}
    with pytest.raises(TimeoutError, match="domain classifier not trained yet"):
        await wait_routable(settings, redis_url, workers=1, timeout_s=0.5)
    await _store_classifier(kb, ["arith"])  # trained before every specialist had its profile: not enough
    with pytest.raises(TimeoutError, match="domain classifier not trained yet"):
        await wait_routable(settings, redis_url, workers=1, timeout_s=0.5)


async def test_ready_once_the_classifier_knows_every_specialist(
    settings: Settings, redis_url: str, aclient: aioredis.Redis, names: Names
) -> None:
    kb = KnowledgeBase(aclient, names)
    await _fleet(kb)
    waiting = asyncio.create_task(wait_routable(settings, redis_url, workers=1, timeout_s=30))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await _store_classifier(kb, ["arith", "sort"])
    await asyncio.wait_for(waiting, timeout=30)
