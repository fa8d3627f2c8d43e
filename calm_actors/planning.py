"""The Plan step: strategies that choose one model from the analyzer's candidates (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from broker.config import PlannerSettings
from broker.messages import Candidate, Decision, Query


@dataclass(frozen=True, slots=True)
class Routable:
    """What a strategy may know of a candidate beyond its scores."""

    candidate: Candidate
    baseline: bool


class Strategy(Protocol):
    """Chooses a model for a query; ``None`` means no model can serve it."""

    name: str

    def choose(self, query: Query, options: list[Routable]) -> Decision | None: ...


def utility(c: Candidate, w: PlannerSettings) -> float:
    """Higher is better: fit and quality, minus normalised latency, energy, errors and a cold-load penalty."""
    return (
        w.w_fit * c.fit
        + w.w_quality * c.quality
        - w.w_latency * c.latency_ms / w.latency_scale_ms
        - w.w_energy * c.energy_j / w.energy_scale_j
        - w.w_errors * c.error_rate
        - (0.0 if c.loaded else w.cold_load_penalty)
    )


def meets_slo(c: Candidate, q: Query) -> bool:
    return (
        (q.slo_latency_ms is None or c.latency_ms <= q.slo_latency_ms)
        and (q.slo_energy_j is None or c.energy_j <= q.slo_energy_j)
        and (q.min_quality is None or c.quality >= q.min_quality)
    )


def slo_shortfall(c: Candidate, q: Query) -> float:
    """How far a candidate misses the query's SLOs, as a sum of relative misses."""
    miss = 0.0
    if q.slo_latency_ms:
        miss += max(0.0, c.latency_ms / q.slo_latency_ms - 1.0)
    if q.slo_energy_j:
        miss += max(0.0, c.energy_j / q.slo_energy_j - 1.0)
    if q.min_quality:
        miss += max(0.0, q.min_quality - c.quality) / q.min_quality
    return miss


class UtilityStrategy:
    """Highest utility among models expected to meet the query's SLOs; the closest when none can."""

    name = "utility"

    def __init__(self, weights: PlannerSettings) -> None:
        self.weights = weights

    def choose(self, query: Query, options: list[Routable]) -> Decision | None:
        if query.model is not None:
            return Decision(model=query.model, reason="pinned by the query")
        pool = [o.candidate for o in options if not o.baseline] or [o.candidate for o in options]
        if not pool:
            return None
        meeting = [c for c in pool if meets_slo(c, query)]
        if meeting:
            best = max(meeting, key=lambda c: utility(c, self.weights))
            return Decision(model=best.model, utility=utility(best, self.weights),
                            reason=f"highest utility of {len(meeting)} models meeting the SLOs")
        closest = min(pool, key=lambda c: (slo_shortfall(c, query), -utility(c, self.weights)))
        return Decision(model=closest.model, utility=utility(closest, self.weights), slo_met=False,
                        reason="no model is expected to meet the SLOs; chose the closest")


def make_strategy(settings: PlannerSettings) -> Strategy:
    strategies = {"utility": UtilityStrategy}
    try:
        return strategies[settings.strategy](settings)
    except KeyError:
        raise ValueError(f"unknown planner strategy {settings.strategy!r}; known: {sorted(strategies)}") from None
