"""Residency policies: which models to load or evict on which worker (pure: the caller owns clock and I/O).

One code path serves the live scheduler and the ``calm bench residency`` simulator. Both call
``place`` when a request needs a model nobody holds (a cold miss) and ``plan`` every interval; both
apply the returned actions in order. Times are seconds on whatever clock the caller runs (wall or
simulated). Memory is in MB (or one unit per model when counting slots).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from broker.config import SchedulerSettings
from calm_actors.forecast import Demand

POLICIES = ("lru", "demand60", "static", "forecast")


@dataclass(slots=True)
class Slot:
    """A worker as a residency policy sees it: its budget, what it may serve, what it holds."""

    worker: str
    budget_mb: float
    servable: frozenset[str]
    loaded: dict[str, float] = field(default_factory=dict)  # model -> last use (s)

    def used_mb(self, memory_mb: Mapping[str, float]) -> float:
        return sum(memory_mb.get(m, 0.0) for m in self.loaded)

    def free_mb(self, memory_mb: Mapping[str, float]) -> float:
        return self.budget_mb - self.used_mb(memory_mb)


@dataclass(frozen=True, slots=True)
class Action:
    kind: str  # "load" | "evict"
    worker: str
    model: str
    reason: str


@dataclass(slots=True)
class ModelCosts:
    """What residency is worth per model: cold-load time (s), value of a served request, one copy's req/s."""

    load_s: dict[str, float] = field(default_factory=dict)
    value: dict[str, float] = field(default_factory=dict)
    capacity_rps: dict[str, float] = field(default_factory=dict)
    default_load_s: float = 1.0

    def cold_cost(self, model: str) -> float:
        """What one request served warm instead of cold saves: load time weighted by the model's value."""
        return max(self.load_s.get(model, self.default_load_s), 1e-3) * self.value.get(model, 1.0)


class ResidencyPolicy(Protocol):
    name: str

    def place(self, model: str, slots: list[Slot], memory_mb: Mapping[str, float], now_s: float,
              pinned: Iterable[str] = ()) -> list[Action]:
        """Actions that make ``model`` resident now (a request waits for it); empty if it is or cannot be."""

    def plan(self, slots: list[Slot], memory_mb: Mapping[str, float], now_s: float,
             pinned: Iterable[str] = ()) -> list[Action]:
        """Actions to take at a planning interval (prefetch, rebalance); empty for reactive policies."""


VictimKey = Callable[[Slot, str], Any]


def place_on_demand(model: str, slots: list[Slot], memory_mb: Mapping[str, float], pinned: Iterable[str],
                    victim_key: VictimKey, why: str) -> list[Action]:
    """Load ``model`` where it fits, evicting as few models as needed, in ``victim_key`` order (lowest first).

    Prefers a worker with free memory (the roomiest); otherwise the worker needing the fewest
    evictions, then the one whose first victim ranks lowest. Never evicts a pinned model.
    """
    if any(model in s.loaded for s in slots):
        return []
    need = memory_mb.get(model, 0.0)
    keep = set(pinned)
    candidates = [s for s in slots if model in s.servable and s.budget_mb >= need]
    if not candidates:
        return []
    roomy = [s for s in candidates if s.free_mb(memory_mb) >= need]
    if roomy:
        best = max(roomy, key=lambda s: s.free_mb(memory_mb))
        return [Action("load", best.worker, model, f"{why}; free memory")]
    plans: list[tuple[int, Any, int, Slot, list[str]]] = []
    for i, slot in enumerate(candidates):
        victims = make_room(slot, need, memory_mb, keep, partial(victim_key, slot))
        if victims is not None:
            plans.append((len(victims), victim_key(slot, victims[0]), i, slot, victims))
    if not plans:
        return []
    _, _, _, slot, victims = min(plans, key=lambda p: (p[0], p[1], p[2]))
    evictions = [Action("evict", slot.worker, v, f"to make room for {model}") for v in victims]
    return [*evictions, Action("load", slot.worker, model, why)]


def make_room(slot: Slot, need: float, memory_mb: Mapping[str, float], keep: set[str],
              key: Callable[[str], Any]) -> list[str] | None:
    """The models to evict from ``slot``, lowest ``key`` first, so ``need`` MB fit; None if they cannot."""
    free = slot.free_mb(memory_mb)
    victims: list[str] = []
    for victim in sorted(slot.loaded, key=key):
        if free >= need:
            break
        if victim in keep:
            continue
        victims.append(victim)
        free += memory_mb.get(victim, 0.0)
    return victims if free >= need else None


def fill(models: Iterable[str], slots: list[Slot], memory_mb: Mapping[str, float]) -> list[Action]:
    """Load models nobody holds into free memory, in the given order, without evicting anything."""
    actions: list[Action] = []
    resident = {m for s in slots for m in s.loaded}
    free = {s.worker: s.free_mb(memory_mb) for s in slots}
    for model in models:
        if model in resident:
            continue
        need = memory_mb.get(model, 0.0)
        fits = [s for s in slots if model in s.servable and free[s.worker] >= need]
        if not fits:
            continue
        slot = max(fits, key=lambda s: free[s.worker])
        free[slot.worker] -= need
        resident.add(model)
        actions.append(Action("load", slot.worker, model, "warm start: free memory"))
    return actions


class LruPolicy:
    """Load on demand; when memory is short evict the least recently used models of one worker."""

    name = "lru"

    def place(self, model: str, slots: list[Slot], memory_mb: Mapping[str, float], now_s: float,
              pinned: Iterable[str] = ()) -> list[Action]:
        return place_on_demand(model, slots, memory_mb, pinned, lambda s, v: s.loaded[v],
                               "load on demand (least recently used make room)")

    def plan(self, slots: list[Slot], memory_mb: Mapping[str, float], now_s: float,
             pinned: Iterable[str] = ()) -> list[Action]:
        return []

    def fill(self, models: Iterable[str], slots: list[Slot], memory_mb: Mapping[str, float]) -> list[Action]:
        return fill(models, slots, memory_mb)


class Demand60Policy:
    """Load on demand; evict the models with the fewest requests in the last ``window_s`` (ties: LRU)."""

    name = "demand60"

    def __init__(self, demand: Demand, window_s: float = 60.0) -> None:
        self.demand = demand
        self.window_s = window_s

    def place(self, model: str, slots: list[Slot], memory_mb: Mapping[str, float], now_s: float,
              pinned: Iterable[str] = ()) -> list[Action]:
        def key(slot: Slot, victim: str) -> tuple[int, float]:
            return self.demand.window(victim, now_s, self.window_s), slot.loaded[victim]

        return place_on_demand(model, slots, memory_mb, pinned, key,
                               f"load on demand (fewest requests in {self.window_s:.0f}s make room)")

    def plan(self, slots: list[Slot], memory_mb: Mapping[str, float], now_s: float,
             pinned: Iterable[str] = ()) -> list[Action]:
        return []


class StaticPolicy:
    """The most demanded models, chosen once and never evicted; one model's room is left for the rest.

    ``ranking`` names the models most demanded first (the operator's or the simulator's knowledge);
    without it the policy ranks by the demand counted so far, once there is any. Misses on models
    outside the chosen set load into the room left over, least recently used first.
    """

    name = "static"

    def __init__(self, demand: Demand, ranking: Sequence[str] = ()) -> None:
        self.demand = demand
        self.ranking = tuple(ranking)
        self.chosen: dict[str, set[str]] | None = None

    def _choose(self, slots: list[Slot], memory_mb: Mapping[str, float]) -> dict[str, set[str]] | None:
        order = list(self.ranking) or sorted((m for m in self.demand.models() if self.demand.total(m) > 0),
                                             key=lambda m: (-self.demand.total(m), m))
        if not order or not slots:
            return None
        chosen: dict[str, set[str]] = {s.worker: set() for s in slots}
        used = {s.worker: 0.0 for s in slots}
        for model in order:
            need = memory_mb.get(model, 0.0)
            others = [memory_mb.get(m, 0.0) for m in order if m != model and not any(m in c for c in chosen.values())]
            reserve = max(others, default=0.0)  # room to load any model left out
            fits = [s for s in slots if model in s.servable and used[s.worker] + need + reserve <= s.budget_mb]
            if fits:
                slot = max(fits, key=lambda s: s.budget_mb - used[s.worker])
                chosen[slot.worker].add(model)
                used[slot.worker] += need
        return chosen

    def _fixed(self) -> set[str]:
        return set().union(*self.chosen.values()) if self.chosen else set()

    def place(self, model: str, slots: list[Slot], memory_mb: Mapping[str, float], now_s: float,
              pinned: Iterable[str] = ()) -> list[Action]:
        return place_on_demand(model, slots, memory_mb, {*pinned, *self._fixed()}, lambda s, v: s.loaded[v],
                               "load on demand into the room the static set leaves")

    def plan(self, slots: list[Slot], memory_mb: Mapping[str, float], now_s: float,
             pinned: Iterable[str] = ()) -> list[Action]:
        if self.chosen is None:
            self.chosen = self._choose(slots, memory_mb)
            if self.chosen is None:
                return []
        by_worker = {s.worker: s for s in slots}
        if all(m in by_worker[w].loaded for w, ms in self.chosen.items() if w in by_worker for m in ms):
            return []
        actions: list[Action] = []
        keep = {*pinned, *self._fixed()}
        for real in slots:
            slot = Slot(real.worker, real.budget_mb, real.servable, dict(real.loaded))  # as it will be
            for model in sorted(self.chosen.get(slot.worker, ())):
                if model in slot.loaded:
                    continue
                victims = make_room(slot, memory_mb.get(model, 0.0), memory_mb, keep, slot.loaded.__getitem__)
                if victims is None:
                    continue
                actions += [Action("evict", slot.worker, v, f"static set: room for {model}") for v in victims]
                actions.append(Action("load", slot.worker, model, "static set"))
                for v in victims:
                    del slot.loaded[v]
                slot.loaded[model] = now_s
        return actions


def make_policy(name: str, settings: SchedulerSettings | None = None, demand: Demand | None = None,
                costs: ModelCosts | None = None, ranking: Sequence[str] = ()) -> ResidencyPolicy:
    """The residency policy called ``name``, reading ``demand`` (and ``costs``) that the caller keeps current."""
    settings = settings or SchedulerSettings()
    demand = demand if demand is not None else Demand(settings.bucket_s)
    if name == "lru":
        return LruPolicy()
    if name == "demand60":
        return Demand60Policy(demand, settings.window_s)
    if name == "static":
        return StaticPolicy(demand, ranking or settings.static_models)
    if name == "forecast":
        from calm_actors.residency_forecast import ForecastPolicy

        return ForecastPolicy(settings, demand, costs)
    raise ValueError(f"unknown residency policy {name!r}; known: {list(POLICIES)}")
