"""Fleet views: one round trip per load, profiles and the classifier re-read only when they change, reloads
only while the view is used."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from broker.kb import KnowledgeBase, WorkerState
from broker.names import Names
from calm_actors import fleetview
from calm_actors.domain_classifier import DomainClassifier, train
from calm_actors.fleetview import LiveView, ViewLoader
from calm_actors.similarity import StackedProfiles


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
    loader = ViewLoader(kb, worker_timeout_s=60)
    view = await loader.load()
    assert np.array_equal(view.models["m"].profile, first)
    # the bytes change but the digest does not: the cached matrix stays (nothing is re-read)
    await aclient.set(names.profile("m"), np.zeros((2, 4), np.float32).tobytes())
    view = await loader.load()
    assert np.array_equal(view.models["m"].profile, first)
    # a new digest (the monitor re-embedded the card) is picked up
    second = np.ones((3, 4)) / 2
    await _setup(kb, second, "d2")
    view = await loader.load()
    assert np.array_equal(view.models["m"].profile, second)


async def test_a_scoring_view_stacks_the_profiles_with_the_configured_rank(aclient: aioredis.Redis,
                                                                            names: Names) -> None:
    kb = KnowledgeBase(aclient, names)
    rows = np.zeros((40, 8))
    rows[:, :3] = np.random.default_rng(0).normal(size=(40, 3))  # three axes hold every row
    await _setup(kb, rows / np.linalg.norm(rows, axis=1, keepdims=True), "d1")
    projected = await ViewLoader(kb, worker_timeout_s=60, scores=True, profile_rank=3).load()
    exact = await ViewLoader(kb, worker_timeout_s=60, scores=True).load()
    assert projected.stacked is not None and projected.stacked.columns.shape == (3, 40)
    assert exact.stacked is not None and exact.stacked.basis is None


async def test_stacking_new_profiles_leaves_the_event_loop_free(aclient: aioredis.Redis, names: Names,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The stacked matrix (an eigen-decomposition for a projected scan) is built off the event loop: while a
    rebuild is under way, other coroutines run (on the loop, this test's rebuild would wait forever)."""
    kb = KnowledgeBase(aclient, names)
    await _setup(kb, np.eye(2, 4), "d1")
    started, release = threading.Event(), threading.Event()

    class GatedStack(StackedProfiles):
        def __init__(self, *args: Any) -> None:
            started.set()
            if not release.wait(timeout=10):
                raise AssertionError("the rebuild was never released: it blocked the event loop")
            super().__init__(*args)

    monkeypatch.setattr(fleetview, "StackedProfiles", GatedStack)
    load = asyncio.create_task(ViewLoader(kb, worker_timeout_s=60, scores=True).load())
    assert await asyncio.to_thread(started.wait, 10)
    assert not load.done()
    release.set()  # only the loop, still running this test, can get here while the rebuild waits
    view = await load
    assert view.stacked is not None and view.stacked.names == ("m",)


async def test_a_model_without_profile_is_not_routable(aclient: aioredis.Redis, names: Names) -> None:
    kb = KnowledgeBase(aclient, names)
    pipe = kb.client.pipeline(transaction=True)
    kb.register_model(pipe, "m", {"description": "adds numbers"})
    kb.register_worker(pipe, WorkerState(id="w1", models_servable=("m",)), ttl_s=60)
    await pipe.execute()
    assert (await ViewLoader(kb, worker_timeout_s=60).load()).models == {}


def _classifier(digest: str) -> DomainClassifier:
    rows = np.eye(2, 4, dtype=np.float32)
    return train({"m": (["1+1=", "2+2="], rows), "n": (["sort 3 1", "sort 2 9"], rows[::-1].copy())}, 0.05, digest)


async def test_the_classifier_is_read_when_its_digest_changes(aclient: aioredis.Redis, names: Names) -> None:
    kb = KnowledgeBase(aclient, names)
    await _setup(kb, np.eye(2, 4), "d1")
    loader = ViewLoader(kb, worker_timeout_s=60, scores=True)
    assert (await loader.load()).classifier is None
    first = _classifier("c1")

    async def store(digest: str, blob: bytes) -> None:
        pipe = kb.client.pipeline(transaction=True)
        kb.set_classifier(pipe, digest, ["m", "n"], blob, now_ms=0)
        await pipe.execute()

    await store("c1", first.to_bytes())
    view = await loader.load()
    assert view.classifier is not None and view.classifier.digest == "c1"
    # same digest, other bytes: nothing is re-read
    await aclient.hset(names.classifier, "blob", b"garbage")
    assert (await loader.load()).classifier is view.classifier
    # a new digest whose blob cannot be decoded: no classifier (cosine fit only), and a warning, not a crash
    await store("c2", b"garbage")
    assert (await loader.load()).classifier is None
    await store("c3", _classifier("c3").to_bytes())
    current = (await loader.load()).classifier
    assert current is not None and current.digest == "c3"
    # views that do not score do not read it
    plain = await ViewLoader(kb, worker_timeout_s=60).load()
    assert plain.classifier is None and plain.stacked is None


class _CountingPipelines:
    """Counts the round trips a KB client makes through pipelines."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client, self.executed = client, 0

    def pipeline(self, transaction: bool = True) -> Any:
        pipe = self.client.pipeline(transaction=transaction)
        execute = pipe.execute

        async def counted(raise_on_error: bool = True) -> Any:
            self.executed += 1
            return await execute(raise_on_error=raise_on_error)

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


async def test_a_load_is_one_round_trip_until_models_or_workers_change(aclient: aioredis.Redis, names: Names) -> None:
    counter = _CountingPipelines(aclient)
    kb = KnowledgeBase(counter, names)  # type: ignore[arg-type]
    await _setup(kb, np.eye(2, 4), "d1")
    loader = ViewLoader(kb, worker_timeout_s=60)
    assert set((await loader.load()).models) == {"m"}
    counter.executed = 0
    await loader.load()
    assert counter.executed == 1
    # a model and a worker join: the load reads the new sets in a second round trip and sees them
    pipe = kb.client.pipeline(transaction=True)
    kb.register_model(pipe, "n", {"description": "sorts digits"})
    kb.set_profile(pipe, "n", np.ones((1, 4), np.float32).tobytes(), 1, "dn")
    kb.register_worker(pipe, WorkerState(id="w2", models_servable=("n",)), ttl_s=60)
    await pipe.execute()
    counter.executed = 0
    view = await loader.load()
    assert set(view.models) == {"m", "n"} and view.models["n"].servable_on == ("w2",)
    assert counter.executed == 2  # the read of the old sets, then of the new ones
    # a backlog on a model's work stream shows in the view
    await aclient.xgroup_create(names.work("m"), names.GROUP_WORKERS, id="0", mkstream=True)
    await aclient.xadd(names.work("m"), {"q": "1"})
    assert (await loader.load()).models["m"].backlog == 1


async def test_a_live_view_reloads_while_used_and_seldom_when_quiet(aclient: aioredis.Redis, names: Names) -> None:
    kb = KnowledgeBase(aclient, names)
    await _setup(kb, np.eye(2, 4), "d1")
    reloads: list[float] = []

    async def count(view: object) -> None:
        reloads.append(1.0)

    live = LiveView(ViewLoader(kb, worker_timeout_s=60), idle_s=3600, stale_s=3600, on_reload=count)
    first = await live.fresh()  # never loaded: older than any stale_s
    assert "m" in first.models and len(reloads) == 1
    assert await live.tick()  # it was used since its load
    assert not await live.tick() and not await live.tick()  # quiet: no reload before idle_s
    assert await live.fresh() is live.view and len(reloads) == 2
    assert await live.tick() and len(reloads) == 3
    quiet = LiveView(ViewLoader(kb, worker_timeout_s=60), idle_s=0.0, stale_s=0.0)
    await quiet.reload()
    assert await quiet.tick()  # idle_s 0: even an unused view is reloaded
    before = quiet.view
    assert await quiet.fresh() is not before  # stale_s 0: every query reloads first
