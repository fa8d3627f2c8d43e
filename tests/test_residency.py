"""The LRU residency policy: where to load, whom to evict, never over budget, never a pinned model."""

from __future__ import annotations

import random

import pytest

from calm_actors.residency import Action, LruPolicy, Slot, make_policy

MEM = {"a": 400.0, "b": 400.0, "c": 200.0, "d": 400.0, "d2": 400.0, "e": 600.0, "big": 5000.0}
ALL = frozenset(MEM)


def _slot(worker: str, budget: float = 1000.0, loaded: dict[str, float] | None = None,
          servable: frozenset[str] = ALL) -> Slot:
    return Slot(worker=worker, budget_mb=budget, servable=servable, loaded=dict(loaded or {}))


def _apply(actions: list[Action], slots: list[Slot], now_ms: float) -> None:
    by_worker = {s.worker: s for s in slots}
    for action in actions:
        slot = by_worker[action.worker]
        if action.kind == "evict":
            assert action.model in slot.loaded, f"evicting {action.model} which {slot.worker} does not hold"
            del slot.loaded[action.model]
        else:
            assert action.kind == "load"
            assert action.model not in slot.loaded
            slot.loaded[action.model] = now_ms


def test_loads_into_the_roomiest_worker() -> None:
    slots = [_slot("w1", loaded={"a": 1.0}), _slot("w2", loaded={"c": 1.0}), _slot("w3", loaded={"a2": 1.0})]
    actions = LruPolicy().place("b", slots, MEM, now_ms=10.0)
    assert [(a.kind, a.worker, a.model) for a in actions] == [("load", "w3", "b")]  # a2 has no known size


def test_no_action_when_already_resident() -> None:
    slots = [_slot("w1", loaded={"a": 1.0}), _slot("w2")]
    assert LruPolicy().place("a", slots, MEM, now_ms=10.0) == []


def test_evicts_the_least_recently_used_only_as_needed() -> None:
    slot = _slot("w1", loaded={"a": 10.0, "b": 5.0, "c": 20.0})  # 1000 of 1000 used
    actions = LruPolicy().place("d", [slot], MEM, now_ms=30.0)
    assert [(a.kind, a.model) for a in actions] == [("evict", "b"), ("load", "d")]
    assert all(a.worker == "w1" for a in actions)


def test_evicts_several_in_lru_order_when_one_is_not_enough() -> None:
    slot = _slot("w1", loaded={"a": 10.0, "b": 5.0, "c": 20.0})
    actions = LruPolicy().place("e", [slot], MEM, now_ms=30.0)
    assert [(a.kind, a.model) for a in actions] == [("evict", "b"), ("evict", "a"), ("load", "e")]


def test_never_evicts_pinned_models() -> None:
    slot = _slot("w1", loaded={"a": 10.0, "b": 5.0, "c": 20.0})
    actions = LruPolicy().place("d", [slot], MEM, now_ms=30.0, pinned=["b"])
    assert [(a.kind, a.model) for a in actions] == [("evict", "a"), ("load", "d")]


def test_nothing_when_only_pinned_models_could_make_room() -> None:
    slot = _slot("w1", loaded={"a": 10.0, "b": 5.0, "c": 20.0})
    assert LruPolicy().place("d", [slot], MEM, now_ms=30.0, pinned=["a", "b"]) == []


def test_prefers_the_worker_needing_fewest_evictions() -> None:
    w1 = _slot("w1", loaded={"c": 1.0, "a": 2.0, "d": 3.0})  # 1000 used: d needs two evictions (c, a)
    w2 = _slot("w2", loaded={"b": 50.0, "e": 60.0})  # 1000 used: b alone frees 400
    actions = LruPolicy().place("d2", [w1, w2], MEM, now_ms=100.0)
    assert [(a.kind, a.worker, a.model) for a in actions] == [("evict", "w2", "b"), ("load", "w2", "d2")]


def test_respects_servable_sets() -> None:
    slots = [_slot("w1", servable=frozenset({"a"})), _slot("w2", budget=500.0, servable=frozenset({"b"}))]
    assert [(a.worker, a.model) for a in LruPolicy().place("b", slots, MEM, 1.0)] == [("w2", "b")]
    assert LruPolicy().place("c", slots, MEM, 1.0) == []


def test_never_loads_a_model_bigger_than_any_budget() -> None:
    slots = [_slot("w1", loaded={"a": 1.0}), _slot("w2")]
    assert LruPolicy().place("big", slots, MEM, 1.0) == []
    assert slots[0].loaded == {"a": 1.0}


@pytest.mark.parametrize("seed", range(5))
def test_random_wants_never_exceed_a_budget(seed: int) -> None:
    rng = random.Random(seed)
    models = [f"m{i}" for i in range(12)]
    memory = {m: float(rng.choice([100, 200, 300, 500, 800])) for m in models}
    slots = [
        _slot(f"w{i}", budget=float(rng.choice([600, 1000, 1500])),
              servable=frozenset(rng.sample(models, rng.randint(4, 12))))
        for i in range(3)
    ]
    pinned = set(rng.sample(models, 2))
    policy = LruPolicy()
    loads = evictions = 0
    for step in range(300):
        now = float(step)
        want = rng.choice(models)
        before = {s.worker: dict(s.loaded) for s in slots}
        actions = policy.place(want, slots, memory, now, pinned=pinned)
        evicted = {a.model for a in actions if a.kind == "evict"}
        assert not evicted & pinned
        if actions:
            assert actions[-1].kind == "load" and actions[-1].model == want
            assert all(a.kind == "evict" for a in actions[:-1])
            assert len({a.worker for a in actions}) == 1  # evictions only where the load goes
            victims = [a.model for a in actions[:-1]]
            if victims:  # only as many as needed: without the last victim the model would not fit
                slot = next(s for s in slots if s.worker == actions[-1].worker)
                free = slot.free_mb(memory) + sum(memory[v] for v in victims[:-1])
                assert free < memory[want]
                evictions += len(victims)
            loads += 1
        _apply(actions, slots, now)
        for slot in slots:
            assert slot.used_mb(memory) <= slot.budget_mb, (seed, step, slot)
        resident = any(want in s.loaded for s in slots)
        if not resident:
            # the policy gave up: then no servable worker could have held it even after evicting every unpinned model
            for slot in slots:
                if want in slot.servable:
                    kept = sum(memory[m] for m in before[slot.worker] if m in pinned)
                    assert kept + memory[want] > slot.budget_mb, (seed, step, slot)
        for s in slots:  # a use refreshes recency, as the scheduler does on requests
            if want in s.loaded:
                s.loaded[want] = now
    assert loads > 0 and evictions > 0  # the sequence exercised both paths


def test_fill_loads_into_free_memory_without_evicting() -> None:
    slots = [_slot("w1", budget=1000.0, loaded={"a": 1.0}), _slot("w2", budget=500.0, servable=frozenset({"c", "b"}))]
    actions = LruPolicy().fill(["a", "b", "c", "d", "e", "big"], slots, MEM)
    assert all(a.kind == "load" for a in actions)
    _apply(actions, slots, 2.0)
    for slot in slots:
        assert slot.used_mb(MEM) <= slot.budget_mb
    loaded = {m for s in slots for m in s.loaded}
    assert "a" in loaded  # nothing evicted
    assert "big" not in loaded
    assert [a.model for a in actions].count("a") == 0  # already resident
    # w1 has 600 free, w2 500 (b or c only): b → w1 (roomiest, 600), c → w2 (500 vs 200), d → none fits 200 left
    assert [(a.worker, a.model) for a in actions] == [("w1", "b"), ("w2", "c")]


def test_fill_accounts_for_its_own_loads() -> None:
    slots = [_slot("w1", budget=1000.0)]
    actions = LruPolicy().fill(["a", "b", "d"], slots, MEM)
    assert [a.model for a in actions] == ["a", "b"]


def test_fill_on_full_workers_does_nothing() -> None:
    slots = [_slot("w1", loaded={"a": 1.0, "b": 2.0, "c": 3.0})]
    assert LruPolicy().fill(["d", "e"], slots, MEM) == []


def test_make_policy() -> None:
    assert make_policy("lru").name == "lru"
    with pytest.raises(ValueError, match="unknown residency policy 'nope'"):
        make_policy("nope")
