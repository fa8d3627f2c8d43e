"""Residency policies: which models to load or evict on which worker (pure, testable, simulator-ready)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class Slot:
    """A worker as a residency policy sees it."""

    worker: str
    budget_mb: float
    servable: frozenset[str]
    loaded: dict[str, float] = field(default_factory=dict)  # model -> last use (ms)

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


class ResidencyPolicy(Protocol):
    name: str

    def place(self, model: str, slots: list[Slot], memory_mb: Mapping[str, float], now_ms: float,
              pinned: Iterable[str] = ()) -> list[Action]: ...


class LruPolicy:
    """Load on demand; when memory is short evict the least recently used models of one worker."""

    name = "lru"

    def place(self, model: str, slots: list[Slot], memory_mb: Mapping[str, float], now_ms: float,
              pinned: Iterable[str] = ()) -> list[Action]:
        """Actions that make ``model`` resident somewhere (empty if it already is or cannot be)."""
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
            return [Action("load", best.worker, model, "free memory")]
        plans: list[tuple[int, float, Slot, list[str]]] = []
        for slot in candidates:
            free = slot.free_mb(memory_mb)
            victims: list[str] = []
            for victim in sorted(slot.loaded, key=slot.loaded.__getitem__):
                if free >= need:
                    break
                if victim in keep:
                    continue
                victims.append(victim)
                free += memory_mb.get(victim, 0.0)
            if free >= need:
                oldest = min((slot.loaded[v] for v in victims), default=now_ms)
                plans.append((len(victims), oldest, slot, victims))
        if not plans:
            return []
        _, _, slot, victims = min(plans, key=lambda p: (p[0], p[1]))
        actions = [Action("evict", slot.worker, v, f"least recently used, to make room for {model}") for v in victims]
        return [*actions, Action("load", slot.worker, model, "load on demand")]

    def fill(self, models: Iterable[str], slots: list[Slot], memory_mb: Mapping[str, float]) -> list[Action]:
        """Load models nobody holds into free memory, without evicting anything."""
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


def make_policy(name: str) -> LruPolicy:
    if name != "lru":
        raise ValueError(f"unknown residency policy {name!r}; known: ['lru']")
    return LruPolicy()
