"""The LRU residency policy: where to load, whom to evict, never over budget, never a pinned model."""

from __future__ import annotations

import random

import pytest

from broker.config import SchedulerSettings
from calm_actors.forecast import Demand
from calm_actors.residency import (
    Action,
    Demand60Policy,
    LruPolicy,
    ModelCosts,
    Slot,
    StaticPolicy,
    fill,
    make_policy,
)
from calm_actors.residency_forecast import ForecastPolicy

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
    actions = LruPolicy().place("b", slots, MEM, now_s=10.0)
    assert [(a.kind, a.worker, a.model) for a in actions] == [("load", "w3", "b")]  # a2 has no known size


def test_no_action_when_already_resident() -> None:
    slots = [_slot("w1", loaded={"a": 1.0}), _slot("w2")]
    assert LruPolicy().place("a", slots, MEM, now_s=10.0) == []


def test_evicts_the_least_recently_used_only_as_needed() -> None:
    slot = _slot("w1", loaded={"a": 10.0, "b": 5.0, "c": 20.0})  # 1000 of 1000 used
    actions = LruPolicy().place("d", [slot], MEM, now_s=30.0)
    assert [(a.kind, a.model) for a in actions] == [("evict", "b"), ("load", "d")]
    assert all(a.worker == "w1" for a in actions)


def test_evicts_several_in_lru_order_when_one_is_not_enough() -> None:
    slot = _slot("w1", loaded={"a": 10.0, "b": 5.0, "c": 20.0})
    actions = LruPolicy().place("e", [slot], MEM, now_s=30.0)
    assert [(a.kind, a.model) for a in actions] == [("evict", "b"), ("evict", "a"), ("load", "e")]


def test_never_evicts_pinned_models() -> None:
    slot = _slot("w1", loaded={"a": 10.0, "b": 5.0, "c": 20.0})
    actions = LruPolicy().place("d", [slot], MEM, now_s=30.0, pinned=["b"])
    assert [(a.kind, a.model) for a in actions] == [("evict", "a"), ("load", "d")]


def test_nothing_when_only_pinned_models_could_make_room() -> None:
    slot = _slot("w1", loaded={"a": 10.0, "b": 5.0, "c": 20.0})
    assert LruPolicy().place("d", [slot], MEM, now_s=30.0, pinned=["a", "b"]) == []


def test_prefers_the_worker_needing_fewest_evictions() -> None:
    w1 = _slot("w1", loaded={"c": 1.0, "a": 2.0, "d": 3.0})  # 1000 used: d needs two evictions (c, a)
    w2 = _slot("w2", loaded={"b": 50.0, "e": 60.0})  # 1000 used: b alone frees 400
    actions = LruPolicy().place("d2", [w1, w2], MEM, now_s=100.0)
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
    for name in ("lru", "demand60", "static", "forecast"):
        assert make_policy(name).name == name
    with pytest.raises(ValueError, match="unknown residency policy 'nope'"):
        make_policy("nope")


def test_fill_is_shared_by_every_policy() -> None:
    slots = [_slot("w1", budget=1000.0)]
    assert fill(["a", "b", "d"], slots, MEM) == LruPolicy().fill(["a", "b", "d"], slots, MEM)


# -- demand60 ------------------------------------------------------------------------
def test_demand60_evicts_the_least_requested_in_the_window_not_the_least_recent() -> None:
    demand = Demand(10.0)
    demand.add("a", 55.0, n=9)  # busy, but used longest ago
    demand.add("b", 58.0, n=1)  # used last, once
    demand.add("c", 57.0, n=4)
    demand.add("b", 1.0, n=50)  # long before the window: does not count
    slot = _slot("w1", loaded={"a": 55.0, "b": 58.0, "c": 57.0})
    actions = Demand60Policy(demand, window_s=60.0).place("d", [slot], MEM, now_s=60.0)
    assert [(a.kind, a.model) for a in actions] == [("evict", "b"), ("load", "d")]
    assert LruPolicy().place("d", [slot], MEM, now_s=60.0)[0].model == "a"  # LRU would have chosen a


# -- static --------------------------------------------------------------------------
def test_static_loads_the_ranked_set_once_and_keeps_room_for_the_rest() -> None:
    mem = {m: 1.0 for m in "abcdef"}
    slot = Slot("w1", 4.0, frozenset(mem), {"f": 0.0})
    policy = StaticPolicy(Demand(10.0), ranking=["a", "b", "c", "d", "e"])
    actions = policy.plan([slot], mem, now_s=1.0)
    assert [(a.kind, a.model) for a in actions] == [("load", "a"), ("load", "b"), ("load", "c")]  # f stays in the room
    _apply(actions, [slot], 1.0)
    assert policy.plan([slot], mem, now_s=2.0) == []
    # A miss uses the room left over: it evicts f, never a static model, even the least recently used one.
    slot.loaded.update({"a": 0.5})
    assert [(a.kind, a.model) for a in policy.place("d", [slot], mem, now_s=3.0)] == [("evict", "f"), ("load", "d")]


def test_static_without_a_ranking_waits_for_demand_then_ranks_by_it() -> None:
    demand = Demand(10.0)
    policy = StaticPolicy(demand)
    slot = _slot("w1", budget=1000.0)
    assert policy.plan([slot], MEM, now_s=1.0) == []
    demand.add("c", 1.0, n=5)
    demand.add("a", 1.0, n=9)
    assert [a.model for a in policy.plan([slot], MEM, now_s=2.0)] == ["a", "c"]
    assert policy.chosen == {"w1": {"a", "c"}}
    demand.add("e", 3.0, n=100)  # chosen once: later demand changes nothing
    _apply(policy.plan([slot], MEM, now_s=2.0), [slot], 2.0)
    assert policy.plan([slot], MEM, now_s=4.0) == [] and policy.chosen == {"w1": {"a", "c"}}


# -- forecast ------------------------------------------------------------------------
def _ramp_demand() -> Demand:
    """a steady at 10 per bucket, b steady at 6, c rising 0, 0, 0, 1, 2, 3, 4, 5: still below b."""
    demand = Demand(10.0)
    for bucket, rising in enumerate([0, 0, 0, 1, 2, 3, 4, 5]):
        demand.add("a", bucket * 10 + 1, n=10)
        demand.add("b", bucket * 10 + 1, n=6)
        if rising:
            demand.add("c", bucket * 10 + 1, n=rising)
    return demand


def test_forecast_prefetches_a_model_before_its_predicted_rise() -> None:
    mem = {"a": 1.0, "b": 1.0, "c": 1.0}
    settings = SchedulerSettings(alpha=0.5, beta=0.5, horizon_s=60.0)
    demand = _ramp_demand()
    slot = Slot("w1", 2.0, frozenset(mem), {"a": 75.0, "b": 79.0})
    actions = ForecastPolicy(settings, demand).plan([slot], mem, now_s=80.0)
    assert demand.count("c", 7) < demand.count("b", 7)  # c is not (yet) busier than b
    assert [(a.kind, a.model) for a in actions] == [("evict", "b"), ("load", "c")]
    assert actions[-1].reason.startswith("prefetch")
    for reactive in ("lru", "demand60"):
        assert make_policy(reactive, settings, demand).plan([slot], mem, 80.0) == []


def test_forecast_counts_history_that_arrives_after_it_looked() -> None:
    """The live scheduler copies demand from the KB; a plan made before the copy (or a count that lands just
    after its bucket closed) must not lose those counts: the forecast is a function of the counts alone."""
    settings = SchedulerSettings(bucket_s=10.0, horizon_s=60.0)
    full = _ramp_demand()
    late = Demand(10.0)
    policy = ForecastPolicy(settings, late)
    assert policy.expected(["a", "c"], now_s=85.0) == {"a": 0.0, "c": 0.0}  # asked before any history arrived
    for model in ("a", "b", "c"):
        late.set(model, {b: full.count(model, b) for b in range(8) if full.count(model, b)})
    truth = ForecastPolicy(settings, full).expected(["a", "b", "c"], now_s=85.0)
    assert policy.expected(["a", "b", "c"], now_s=85.0) == pytest.approx(truth)
    assert truth["a"] > 0.0 and truth["c"] > 0.0
    late.set("a", {**{b: full.count("a", b) for b in range(8)}, 7: 30})  # a late count in a bucket already fed
    full.add("a", 71.0, n=20)
    assert policy.expected(["a"], now_s=85.0)["a"] == pytest.approx(
        ForecastPolicy(settings, full).expected(["a"], now_s=85.0)["a"])


def test_forecast_keeps_its_place_without_a_trend_thanks_to_hysteresis() -> None:
    mem = {"a": 1.0, "b": 1.0, "c": 1.0}
    demand = Demand(10.0)
    for bucket in range(8):
        demand.add("a", bucket * 10 + 1, n=10)
        demand.add("b", bucket * 10 + 1, n=6)
        demand.add("c", bucket * 10 + 1, n=7)  # a bit busier than b, not by the hysteresis margin
    slot = Slot("w1", 2.0, frozenset(mem), {"a": 75.0, "b": 79.0})
    settings = SchedulerSettings(hysteresis=0.25)
    assert ForecastPolicy(settings, demand).plan([slot], mem, now_s=80.0) == []
    swapped = ForecastPolicy(SchedulerSettings(hysteresis=0.0), demand).plan([slot], mem, now_s=80.0)
    assert [(a.kind, a.model) for a in swapped] == [("evict", "b"), ("load", "c")]


def test_forecast_eviction_order_honours_the_plan_not_recency() -> None:
    demand = Demand(10.0)
    for bucket in range(6):
        demand.add("a", bucket * 10 + 1, n=9)
        demand.add("c", bucket * 10 + 1, n=5)
        demand.add("b", bucket * 10 + 1, n=1)
    # a was used longest ago, b most recently: LRU would evict a, the forecast evicts b (least expected).
    slot = _slot("w1", loaded={"a": 10.0, "b": 59.0, "c": 40.0})
    policy = ForecastPolicy(SchedulerSettings(), demand)
    assert [(a.kind, a.model) for a in policy.place("d", [slot], MEM, now_s=60.0)] == [("evict", "b"), ("load", "d")]
    assert [(a.kind, a.model) for a in policy.place("e", [slot], MEM, now_s=60.0)] == [
        ("evict", "b"), ("evict", "c"), ("load", "e")]  # several victims: least expected first
    assert LruPolicy().place("d", [slot], MEM, now_s=60.0)[0].model == "a"


def test_forecast_never_evicts_pinned_or_freshly_prefetched_models_to_plan() -> None:
    mem = {"a": 1.0, "b": 1.0, "c": 1.0}
    settings = SchedulerSettings(alpha=0.5, beta=0.5, horizon_s=60.0, min_residency_s=30.0)
    slot = Slot("w1", 2.0, frozenset(mem), {"a": 75.0, "b": 79.0})
    assert ForecastPolicy(settings, _ramp_demand()).plan([slot], mem, 80.0, pinned={"b"}) == []
    # A model the plan itself loaded stays min_residency_s, even when the forecast turns against it.
    policy = ForecastPolicy(settings, _ramp_demand())
    _apply(policy.plan([slot], mem, 80.0), [slot], 80.0)
    assert set(slot.loaded) == {"a", "c"}
    policy.demand.add("b", 85.0, n=70)  # b surges; a has queries waiting (pinned), c was just prefetched
    assert policy.plan([slot], mem, 86.0, pinned={"a"}) == []
    for t in (95.0, 105.0, 110.5):  # b keeps it up (a burst that stopped would read as over)
        policy.demand.add("b", t, n=70)
    assert [(a.kind, a.model) for a in policy.plan([slot], mem, 111.0, pinned={"a"})] == [("evict", "c"), ("load", "b")]


def test_forecast_spreads_replicas_when_one_copy_cannot_keep_up() -> None:
    mem = {"a": 1.0, "b": 1.0}
    demand = Demand(10.0)
    for bucket in range(6):
        demand.add("a", bucket * 10 + 1, n=100)  # 10 requests/s
        demand.add("b", bucket * 10 + 1, n=2)
    slots = [Slot("w1", 1.0, frozenset(mem), {"a": 59.0}), Slot("w2", 1.0, frozenset(mem), {"b": 59.0})]
    costs = ModelCosts(capacity_rps={"a": 4.0, "b": 4.0})  # one copy serves 4 requests/s
    actions = ForecastPolicy(SchedulerSettings(hysteresis=0.0), demand, costs).plan(slots, mem, now_s=60.0)
    assert [(a.kind, a.worker, a.model) for a in actions] == [("evict", "w2", "b"), ("load", "w2", "a")]
    alone = ForecastPolicy(SchedulerSettings(hysteresis=0.0), demand, ModelCosts()).plan(slots, mem, now_s=60.0)
    assert alone == []  # without a throughput limit, one copy is enough


@pytest.mark.parametrize("seed", range(4))
def test_forecast_random_demand_never_exceeds_a_budget_or_evicts_pinned(seed: int) -> None:
    rng = random.Random(seed)
    models = [f"m{i}" for i in range(12)]
    memory = {m: float(rng.choice([100, 200, 300, 500, 800])) for m in models}
    slots = [_slot(f"w{i}", budget=float(rng.choice([600, 1000, 1500])),
                   servable=frozenset(rng.sample(models, rng.randint(4, 12)))) for i in range(3)]
    demand = Demand(10.0)
    policy = ForecastPolicy(SchedulerSettings(min_residency_s=5.0), demand,
                            ModelCosts(capacity_rps={m: 0.5 for m in models}))
    busy = rng.sample(models, 4)
    loads = evictions = 0
    for step in range(600):
        now = step * 0.5
        if step % 150 == 0:
            busy = rng.sample(models, 4)
        want = rng.choice(busy) if rng.random() < 0.8 else rng.choice(models)
        demand.add(want, now)
        pinned = set(rng.sample(models, 2))
        for step_actions in (policy.place, policy.plan):
            if step_actions == policy.place:
                actions = policy.place(want, slots, memory, now, pinned)
            else:
                actions = policy.plan(slots, memory, now, pinned)
            assert not {a.model for a in actions if a.kind == "evict"} & pinned
            loads += sum(a.kind == "load" for a in actions)
            evictions += sum(a.kind == "evict" for a in actions)
            _apply(actions, slots, now)
            for slot in slots:
                assert slot.used_mb(memory) <= slot.budget_mb, (seed, step, slot)
                assert set(slot.loaded) <= slot.servable
        for s in slots:
            if want in s.loaded:
                s.loaded[want] = now
    assert loads > 0 and evictions > 0


def test_forecast_request_evicts_an_old_model_before_one_just_loaded_on_demand() -> None:
    # a and b were busy long ago (high forecast); c has just been loaded on demand for a request.
    mem = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}
    demand = Demand(10.0)
    for bucket in range(6):
        demand.add("a", bucket * 10 + 1, n=9)
        demand.add("b", bucket * 10 + 1, n=9)
        demand.add("c", bucket * 10 + 2, n=3)
    policy = ForecastPolicy(SchedulerSettings(min_residency_s=30.0), demand)
    slot = Slot("w1", 3.0, frozenset(mem), {"a": 50.0, "b": 50.0})
    _apply(policy.place("c", [slot], mem, now_s=60.0), [slot], 60.0)
    assert set(slot.loaded) == {"a", "b", "c"}
    demand.add("c", 60.5)  # asked for again since its load: c's demand goes on
    # d is asked for within c's minimum residency: c has the lowest forecast, but a (old) goes instead.
    actions = policy.place("d", [slot], mem, now_s=61.0)
    assert [(a.kind, a.model) for a in actions] == [("evict", "a"), ("load", "d")]
    # Once c is old, the lowest forecast makes room again (all three still asked for as before).
    for bucket in range(6, 10):
        demand.add("a", bucket * 10 + 1, n=9)
        demand.add("b", bucket * 10 + 1, n=9)
        demand.add("c", bucket * 10 + 2, n=3)
    later = Slot("w1", 3.0, frozenset(mem), {"a": 50.0, "b": 50.0, "c": 61.0})
    assert policy.place("d", [later], mem, now_s=95.0)[0].model == "c"


def _busy_pair() -> tuple[Demand, dict[str, float]]:
    """a and b asked for 9 times per 10-s bucket from 0 s to 70 s; c and d never before."""
    demand = Demand(10.0)
    for bucket in range(7):
        demand.add("a", bucket * 10 + 1, n=9)
        demand.add("b", bucket * 10 + 1, n=9)
    return demand, {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}


def test_forecast_model_of_a_one_off_request_is_the_first_to_go() -> None:
    # c is loaded on demand for one request and not asked for again: a request for d evicts c, not a busy model.
    demand, mem = _busy_pair()
    policy = ForecastPolicy(SchedulerSettings(min_residency_s=30.0), demand)
    slot = Slot("w1", 3.0, frozenset(mem), {"a": 50.0, "b": 50.0})
    demand.add("c", 60.0)
    _apply(policy.place("c", [slot], mem, now_s=60.0), [slot], 60.0)
    demand.add("d", 61.0)
    actions = policy.place("d", [slot], mem, now_s=61.0)
    assert [(a.kind, a.model) for a in actions] == [("evict", "c"), ("load", "d")]


def test_forecast_request_waits_for_a_busy_one_off_model_rather_than_evict_a_busy_one() -> None:
    demand, mem = _busy_pair()
    costs = ModelCosts(load_s={m: 2.0 for m in mem})
    settings = SchedulerSettings(min_residency_s=30.0, interval_ms=1000)
    policy = ForecastPolicy(settings, demand, costs)
    slot = Slot("w1", 3.0, frozenset(mem), {"a": 50.0, "b": 50.0})
    demand.add("c", 60.0)
    _apply(policy.place("c", [slot], mem, now_s=60.0), [slot], 60.0)
    demand.add("d", 60.5)
    # c still loads (pinned): d waits for it instead of pushing out a or b ...
    assert policy.place("d", [slot], mem, now_s=60.5, pinned={"c"}) == []
    assert "d" in policy.waiting
    # ... and takes c's room once c is done.
    actions = policy.place("d", [slot], mem, now_s=62.5)
    assert [(a.kind, a.model) for a in actions] == [("evict", "c"), ("load", "d")]
    assert "d" not in policy.waiting
    # The wait is bounded (two of c's loads and two intervals: 6 s): a model that stays busy is not waited for.
    demand.add("c", 63.0)
    _apply(actions, [slot], 62.5)
    _apply([Action("evict", "w1", "d", "test"), Action("load", "w1", "c", "test")], [slot], 63.0)
    policy.note([Action("load", "w1", "c", "test")], 63.0)
    demand.add("d", 63.5)
    assert policy.place("d", [slot], mem, now_s=63.5, pinned={"c"}) == []
    assert policy.place("d", [slot], mem, now_s=68.0, pinned={"c"}) == []
    late = policy.place("d", [slot], mem, now_s=69.6, pinned={"c"})
    assert [a.kind for a in late] == ["evict", "load"] and late[0].model in {"a", "b"}
    # A busy model resident from before the policy started, or prefetched by the plan, is never waited for.
    held = Slot("w1", 3.0, frozenset(mem), {"a": 50.0, "b": 50.0, "c": 70.0})
    fresh = ForecastPolicy(settings, demand, costs)
    assert fresh.place("d", [held], mem, now_s=70.5, pinned={"c"})[0].model in {"a", "b"}
    planned = ForecastPolicy(settings, demand, costs)
    planned.note([Action("load", "w1", "c", "prefetch")], 70.0, by_plan=True)
    assert planned.place("d", [held], mem, now_s=70.5, pinned={"c"})[0].model in {"a", "b"}


def test_forecast_plan_never_evicts_a_model_with_backlog_or_one_worth_more() -> None:
    mem = {"a": 1.0, "b": 1.0, "c": 1.0}
    settings = SchedulerSettings(alpha=0.5, beta=0.5, horizon_s=60.0, hysteresis=0.0)
    slot = Slot("w1", 2.0, frozenset(mem), {"a": 75.0, "b": 79.0})
    # The plan would swap b for the rising c (see the prefetch test); with work queued for b it may not.
    assert ForecastPolicy(settings, _ramp_demand()).plan([slot], mem, 80.0, pinned={"b"}) == []
    # Nothing resident is worth less than c: the plan loads nothing rather than evict for a lesser model.
    demand = Demand(10.0)
    for bucket in range(8):
        demand.add("a", bucket * 10 + 1, n=10)
        demand.add("b", bucket * 10 + 1, n=10)
        demand.add("c", bucket * 10 + 1, n=3)
    assert ForecastPolicy(settings, demand).plan([slot], mem, now_s=80.0) == []


def test_forecast_noted_loads_count_as_young_only_for_requests() -> None:
    # A warm start's fill (noted by the caller) is protected from a request's eviction like a load on demand.
    mem = {"a": 1.0, "b": 1.0, "c": 1.0}
    demand = Demand(10.0)
    for bucket in range(6):
        demand.add("a", bucket * 10 + 1, n=9)
        demand.add("b", bucket * 10 + 1, n=2)
    policy = ForecastPolicy(SchedulerSettings(min_residency_s=30.0), demand)
    slot = Slot("w1", 2.0, frozenset(mem), {"a": 10.0})
    policy.note([Action("load", "w1", "b", "warm start: free memory")], 58.0)
    slot.loaded["b"] = 58.0
    assert [(a.kind, a.model) for a in policy.place("c", [slot], mem, now_s=60.0)] == [("evict", "a"), ("load", "c")]


def test_forecast_does_not_fetch_back_a_prefetch_a_request_pushed_out_before_it_was_asked_for() -> None:
    # The thrash of a short phase shift: the plan fetches b back, a request for c pushes it out, again and again.
    mem = {"a": 1.0, "b": 1.0, "c": 1.0}
    demand = Demand(10.0)
    for bucket in range(8):
        demand.add("a", bucket * 10 + 1, n=10)
        demand.add("b", bucket * 10 + 1, n=6)
    demand.add("c", 79.0)
    policy = ForecastPolicy(SchedulerSettings(change_p=0.0), demand)  # b stays forecast busy (no change test)
    slot = Slot("w1", 2.0, frozenset(mem), {"a": 79.0, "c": 79.0})
    plan = policy.plan([slot], mem, 80.0)
    assert [(a.kind, a.model) for a in plan] == [("evict", "c"), ("load", "b")]  # c looked like a one-off
    _apply(plan, [slot], 80.0)
    demand.add("c", 80.5)  # it was not: c is asked for again, with work waiting for a (pinned)
    place = policy.place("c", [slot], mem, 80.5, pinned={"a"})
    assert [(a.kind, a.model) for a in place] == [("evict", "b"), ("load", "c")]
    _apply(place, [slot], 80.5)
    assert policy.plan([slot], mem, 81.0) == []  # b was fetched for nothing and pushed out: not again
    assert policy.plan([slot], mem, 95.5) == []
    demand.add("b", 96.0)  # b is asked for: the forecast may fetch it again
    assert [(a.kind, a.model) for a in policy.plan([slot], mem, 97.0)] == [("evict", "c"), ("load", "b")]
