"""The fleet view reads a model's routing profile again only when the monitor re-embeds it."""

from __future__ import annotations

import numpy as np
import redis.asyncio as aioredis

from broker.kb import KnowledgeBase, WorkerState
from broker.names import Names
from calm_actors.fleetview import ProfileCache, load_view


async def _setup(kb: KnowledgeBase, profile: np.ndarray, digest: str) -> None:
    pipe = kb.client.pipeline(transaction=True)
    kb.register_model(pipe, "m", {"description": "adds numbers"})
    kb.set_profile(pipe, "m", profile.astype(np.float32).tobytes(), profile.shape[0], digest)
    kb.register_worker(pipe, WorkerState(id="w1", models_servable=("m",)), ttl_s=60)
    await pipe.execute()


async def test_profiles_are_cached_by_digest(aclient: aioredis.Redis, names: Names) -> None:
    kb = KnowledgeBase(aclient, names)
    first = np.eye(2, 4)
    await _setup(kb, first, "d1")
    cache = ProfileCache()
    view = await load_view(kb, names, worker_timeout_s=60, profiles=cache)
    assert np.array_equal(view.models["m"].profile, first)
    # the bytes change but the digest does not: the cached matrix stays (nothing is re-read)
    await aclient.set(names.profile("m"), np.zeros((2, 4), np.float32).tobytes())
    view = await load_view(kb, names, worker_timeout_s=60, profiles=cache)
    assert np.array_equal(view.models["m"].profile, first)
    # a new digest (the monitor re-embedded the card) is picked up
    second = np.ones((3, 4)) / 2
    await _setup(kb, second, "d2")
    view = await load_view(kb, names, worker_timeout_s=60, profiles=cache)
    assert np.array_equal(view.models["m"].profile, second)


async def test_a_model_without_profile_is_not_routable(aclient: aioredis.Redis, names: Names) -> None:
    kb = KnowledgeBase(aclient, names)
    pipe = kb.client.pipeline(transaction=True)
    kb.register_model(pipe, "m", {"description": "adds numbers"})
    kb.register_worker(pipe, WorkerState(id="w1", models_servable=("m",)), ttl_s=60)
    await pipe.execute()
    assert (await load_view(kb, names, worker_timeout_s=60)).models == {}
