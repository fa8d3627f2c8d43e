"""The Plan step: strategies that choose one model from the analyzer's candidates (pure functions)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import msgspec

from broker.config import PlannerSettings
from broker.kb import QUALITY_SE_SUFFIX
from broker.messages import Candidate, Decision, Query


@dataclass(frozen=True, slots=True)
class Heldout:
    """A model's measured quality on the query's domain (from its card): metric, value, standard error."""

    metric: str
    value: float
    se: float = 0.0


@dataclass(frozen=True, slots=True)
class Routable:
    """What a strategy may know of a candidate beyond its scores."""

    candidate: Candidate
    baseline: bool
    heldout: Heldout | None = None
    claims_domain: bool = True  # the card lists the query's domain, or lists no domain at all


FLOOR_Z = 2.0  # a model is below the floor only when the gap exceeds this many standard errors of the difference


def heldout_on(quality: Mapping[str, float], domain: str) -> Heldout | None:
    """The card's quality on ``domain`` (the key ``domain`` or the first ``domain.<metric>``), if any."""
    if not domain:
        return None
    keys = [domain] if domain in quality else sorted(
        k for k in quality if k.startswith(f"{domain}.") and not k.endswith(QUALITY_SE_SUFFIX))
    if not keys:
        return None
    return Heldout(keys[0], float(quality[keys[0]]), float(quality.get(keys[0] + QUALITY_SE_SUFFIX, 0.0)))


def above_quality_floor(options: list[Routable], tolerance: float) -> list[Routable]:
    """Options whose held-out quality is not clearly below the best on the same metric.

    Clearly below: under the best by more than ``tolerance`` (a fraction of the best) plus ``FLOOR_Z``
    standard errors of the difference (eval sets are samples: 1 item in 300 is no evidence). An option
    without a measurement stays if its card claims the domain (or no domain): a model nobody evaluated
    is not presumed worse. When nothing is measured on the domain, every option stays.
    """
    best: dict[str, Heldout] = {}
    for o in options:
        h = o.heldout
        if h is not None and (h.metric not in best or h.value > best[h.metric].value):
            best[h.metric] = h

    if not best:
        return options

    def kept(o: Routable) -> bool:
        h = o.heldout
        if h is None:
            return o.claims_domain
        top = best[h.metric]
        return h.value >= top.value * (1.0 - tolerance) - FLOOR_Z * math.hypot(h.se, top.se)

    return [o for o in options if kept(o)]


class Strategy(Protocol):
    """Chooses a model for a query; ``None`` means no model can serve it."""

    name: str
    weights: PlannerSettings

    def choose(self, query: Query, options: list[Routable], now_s: float | None = None) -> Decision | None: ...


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


PINNED = "pinned by the query"
MAX_MARGIN_SCALE = 5.0
NEVER_SEEN_S = 1e8
PROBE_MIN_FIT_SHARE = 0.5  # an exploration probe goes only to a model fitting at least half as well as the best


def if_loaded(c: Candidate) -> Candidate:
    """The candidate as it would score were it already loaded (no load time, no cold penalty)."""
    return msgspec.structs.replace(c, loaded=True, latency_ms=c.latency_ms - c.load_ms, load_ms=0.0)


class UtilityStrategy:
    """Highest utility among models expected to meet the query's SLOs; the closest when none can.

    Quality-floored (models whose held-out quality on the query's domain is more than
    ``quality_tolerance`` below the best model's are left out, a baseline that is best kept in),
    residency-aware (a cold model pays its load time and a penalty, and the model that would have won
    if loaded is reported as ``wanted``) and exploring: a near-best model whose QoS has gone stale is
    probed with one query, at most once per ``explore_interval_s``, and only when it meets the SLOs.
    """

    name = "utility"

    def __init__(self, weights: PlannerSettings) -> None:
        self.weights = weights
        self._probed: dict[str, float] = {}

    def choose(self, query: Query, options: list[Routable], now_s: float | None = None) -> Decision | None:
        if query.model is not None:
            return Decision(model=query.model, reason=PINNED)
        w = self.weights
        floored = above_quality_floor(options, w.quality_tolerance) if w.quality_tolerance < 1.0 else options
        tiers = (floored, options)
        pool = [o.candidate for o in floored if w.route_to_baseline or not o.baseline or not _specialists(floored)]
        if not pool:
            return None
        meeting = [c for c in pool if meets_slo(c, query)]
        if not meeting:
            closest = min(pool, key=lambda c: (slo_shortfall(c, query), -utility(c, w)))
            return Decision(model=closest.model, utility=utility(closest, w), slo_met=False,
                            reason="no model is expected to meet the SLOs; chose the closest",
                            fallbacks=self._fallbacks(pool, closest.model, tiers))
        best = max(meeting, key=lambda c: utility(c, w))
        ideal = max(pool, key=lambda c: utility(if_loaded(c), w))
        wanted = ideal.model if ideal.model != best.model and not ideal.loaded else ""
        probe = self._probe(meeting, best, time.time() if now_s is None else now_s)
        if probe is not None:
            return Decision(model=probe.model, utility=utility(probe, w), explored=True, wanted=wanted,
                            fallbacks=[best.model, *self._fallbacks(pool, probe.model, tiers, 1)],
                            reason=f"exploring: QoS of {probe.model} is {probe.age_s:.0f}s old (best was {best.model})")
        reason = f"highest utility of {len(meeting)} models meeting the SLOs"
        if wanted:
            reason += f"; {wanted} would fit better once loaded"
        if len(floored) < len(options):
            kept = {o.candidate.model for o in floored}
            reason += "; below the held-out quality floor: " + ", ".join(
                o.candidate.model for o in options if o.candidate.model not in kept)
        return Decision(model=best.model, utility=utility(best, w), reason=reason, wanted=wanted,
                        fallbacks=self._fallbacks(pool, best.model, tiers))

    def _fallbacks(self, pool: list[Candidate], chosen: str, tiers: tuple[list[Routable], ...] = (),
                   n: int = 2) -> list[str]:
        """The next ``n`` choices: the pool by utility, then the options it left out (a baseline above the
        quality floor, then models below it), so a failed attempt still finds a model to retry on."""
        names = [c.model for c in sorted(pool, key=lambda c: -utility(c, self.weights)) if c.model != chosen]
        for tier in tiers:
            if len(names) >= n:
                break
            seen = {chosen, *names}
            rest = sorted((o.candidate for o in tier if o.candidate.model not in seen),
                          key=lambda c: -utility(c, self.weights))
            names += [c.model for c in rest]
        return names[:n]

    def _probe(self, meeting: list[Candidate], best: Candidate, now_s: float) -> Candidate | None:
        interval = self.weights.explore_interval_s
        if interval <= 0:
            return None
        best_u = utility(best, self.weights)

        def close_enough(c: Candidate) -> bool:  # the older the estimate, the less it is trusted
            trust = min(MAX_MARGIN_SCALE, max(1.0, c.age_s / interval))
            return utility(c, self.weights) >= best_u - self.weights.explore_margin * trust

        # Only models with telemetry that went stale (a model never measured keeps its optimistic prior)
        # and that fit the query about as well as the best: probing an unrelated model only costs quality.
        stale = [c for c in meeting if c.model != best.model and c.loaded and interval < c.age_s < NEVER_SEEN_S
                 and c.fit >= PROBE_MIN_FIT_SHARE * best.fit
                 and close_enough(c) and now_s - self._probed.get(c.model, 0.0) > interval]
        if not stale:
            return None
        choice = max(stale, key=lambda c: c.age_s)
        self._probed[choice.model] = now_s
        return choice


def _specialists(options: list[Routable]) -> bool:
    return any(not o.baseline for o in options)


def routable_pool(options: list[Routable]) -> list[Candidate]:
    """Non-baseline candidates sorted by name (all candidates when only baselines remain)."""
    pool = [o.candidate for o in options if not o.baseline] or [o.candidate for o in options]
    return sorted(pool, key=lambda c: c.model)


class SimpleStrategy:
    """Base of the benchmark strategies: pins are honoured, baselines left out, ``pick`` chooses."""

    name = "simple"

    def __init__(self, weights: PlannerSettings) -> None:
        self.weights = weights

    def choose(self, query: Query, options: list[Routable], now_s: float | None = None) -> Decision | None:
        if query.model is not None:
            return Decision(model=query.model, reason=PINNED)
        pool = routable_pool(options)
        return self.pick(query, pool) if pool else None

    def pick(self, query: Query, pool: list[Candidate]) -> Decision:
        raise NotImplementedError


class SemanticStrategy(SimpleStrategy):
    """The paper's prototype in practice: the most similar model, nothing else considered."""

    name = "semantic"

    def pick(self, query: Query, pool: list[Candidate]) -> Decision:
        best = max(pool, key=lambda c: c.fit)
        return Decision(model=best.model, utility=best.fit, reason="most similar model (semantic routing)")


class RandomStrategy(SimpleStrategy):
    """A uniformly random non-baseline model (a control for benchmarks); seeded per query id."""

    name = "random"

    def pick(self, query: Query, pool: list[Candidate]) -> Decision:
        return Decision(model=pool[random.Random(query.id).randrange(len(pool))].model, reason="random choice")


class RoundRobinStrategy(SimpleStrategy):
    """Non-baseline models in turn (a control for benchmarks)."""

    name = "round-robin"

    def __init__(self, weights: PlannerSettings) -> None:
        super().__init__(weights)
        self._next = 0

    def pick(self, query: Query, pool: list[Candidate]) -> Decision:
        choice = pool[self._next % len(pool)]
        self._next += 1
        return Decision(model=choice.model, reason="round robin")


STRATEGIES: dict[str, Callable[[PlannerSettings], Strategy]] = {
    "utility": UtilityStrategy, "semantic": SemanticStrategy, "random": RandomStrategy,
    "round-robin": RoundRobinStrategy,
}


def make_strategy(settings: PlannerSettings) -> Strategy:
    strategies = STRATEGIES
    try:
        return strategies[settings.strategy](settings)
    except KeyError:
        raise ValueError(f"unknown planner strategy {settings.strategy!r}; known: {sorted(strategies)}") from None
