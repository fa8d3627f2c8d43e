"""The fleet view reads a model's routing profile (and the domain classifier) again only when it changes."""

from __future__ import annotations

import numpy as np
import redis.asyncio as aioredis

from broker.kb import KnowledgeBase, WorkerState
from broker.names import Names
from calm_actors.domain_classifier import DomainClassifier, train
from calm_actors.fleetview import ClassifierCache, ProfileCache, load_view


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


def _classifier(digest: str) -> DomainClassifier:
    rows = np.eye(2, 4, dtype=np.float32)
    return train({"m": (["1+1=", "2+2="], rows), "n": (["sort 3 1", "sort 2 9"], rows[::-1].copy())}, 0.05, digest)


async def test_the_classifier_is_read_when_its_digest_changes(aclient: aioredis.Redis, names: Names) -> None:
    kb = KnowledgeBase(aclient, names)
    await _setup(kb, np.eye(2, 4), "d1")
    cache = ClassifierCache()
    assert (await load_view(kb, names, worker_timeout_s=60, classifiers=cache)).classifier is None
    first = _classifier("c1")

    async def store(digest: str, blob: bytes) -> None:
        pipe = kb.client.pipeline(transaction=True)
        kb.set_classifier(pipe, digest, ["m", "n"], blob, now_ms=0)
        await pipe.execute()

    await store("c1", first.to_bytes())
    view = await load_view(kb, names, worker_timeout_s=60, classifiers=cache)
    assert view.classifier is not None and view.classifier.digest == "c1"
    # same digest, other bytes: nothing is re-read
    await aclient.hset(names.classifier, "blob", b"garbage")
    assert (await cache.current(kb)) is view.classifier
    # a new digest whose blob cannot be decoded: no classifier (cosine fit only), and a warning, not a crash
    await store("c2", b"garbage")
    assert await cache.current(kb) is None
    await store("c3", _classifier("c3").to_bytes())
    current = await cache.current(kb)
    assert current is not None and current.digest == "c3"
    # views that do not score do not read it
    plain = await load_view(kb, names, worker_timeout_s=60)
    assert plain.classifier is None and plain.stacked is None
