"""Demand per model in time buckets, and forecasters that predict it (pure: no I/O, no clock)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from broker.config import SchedulerSettings


class Demand:
    """Requests per model, counted in buckets ``int(t // bucket_s)`` of a real or simulated clock."""

    def __init__(self, bucket_s: float) -> None:
        if bucket_s <= 0:
            raise ValueError("bucket_s must be > 0")
        self.bucket_s = bucket_s
        self._counts: dict[str, dict[int, int]] = {}
        self._totals: dict[str, int] = {}
        self.version = 0  # changes whenever a count does
        self._revised: int | None = None  # the earliest bucket given a new count since ``take_revised``

    def bucket(self, t_s: float) -> int:
        return math.floor(t_s / self.bucket_s)

    def add(self, model: str, t_s: float, n: int = 1) -> None:
        """Count ``n`` requests for ``model`` at time ``t_s``."""
        buckets = self._counts.setdefault(model, {})
        b = self.bucket(t_s)
        buckets[b] = buckets.get(b, 0) + n
        self._totals[model] = self._totals.get(model, 0) + n
        self.version += 1
        self._revise(b)

    def set(self, model: str, buckets: Mapping[int, int]) -> None:
        """Replace ``model``'s history (the live scheduler copies it from the knowledge base)."""
        old = self._counts.get(model, {})
        changed = [b for b, n in buckets.items() if old.get(b) != n]
        self._counts[model] = dict(buckets)
        self._totals[model] = sum(buckets.values())
        self.version += 1
        if changed:
            self._revise(min(changed))

    def _revise(self, bucket: int) -> None:
        self._revised = bucket if self._revised is None else min(self._revised, bucket)

    def take_revised(self) -> int | None:
        """The earliest bucket whose count was added or changed since the last call (None: none was).

        A forecaster that has consumed that bucket already must start again from the history: a count
        that arrives late (or a history copied in after a forecast began) would otherwise be lost.
        """
        revised, self._revised = self._revised, None
        return revised

    def models(self) -> list[str]:
        return sorted(self._counts)

    def count(self, model: str, bucket: int) -> int:
        return self._counts.get(model, {}).get(bucket, 0)

    def total(self, model: str) -> int:
        """Every request counted for ``model`` (or held in its history, when set from outside)."""
        return self._totals.get(model, 0)

    def first_bucket(self) -> int | None:
        starts = [min(b) for b in self._counts.values() if b]
        return min(starts) if starts else None

    def window(self, model: str, now_s: float, span_s: float) -> int:
        """Requests in about the last ``span_s``: the buckets after the one holding ``now_s - span_s``."""
        buckets = self._counts.get(model)
        if not buckets:
            return 0
        first, last = self.bucket(now_s - span_s) + 1, self.bucket(now_s)
        if last - first + 1 > len(buckets):
            return sum(n for b, n in buckets.items() if first <= b <= last)
        return sum(buckets.get(b, 0) for b in range(first, last + 1))


RARE = 0.1  # requests per bucket the change test assumes at least (one every ten buckets)


def surprise(observed: float, expected: float) -> float:
    """How unlikely ``observed`` requests are where ``expected`` were due, in nats (Poisson, either side).

    The Chernoff bound ``-ln P(X <= observed)`` below the expectation (``-ln P(X >= observed)``
    above it): ``expected - observed + observed * ln(observed / expected)``. ``expected`` is floored
    at :data:`RARE` (a model that was never asked for is not infinitely surprising when it is).
    """
    expected = max(expected, RARE)
    if observed <= 0.0:
        return expected
    return expected - observed + observed * math.log(observed / expected)


@dataclass(frozen=True, slots=True)
class Run:
    """Consecutive buckets on one side of the forecast: what came, what was due, the seasonal offsets."""

    below: bool = False
    observed: float = 0.0
    expected: float = 0.0
    offsets: float = 0.0
    buckets: float = 0.0

    def extend(self, observed: float, expected: float, offset: float, weight: float = 1.0) -> Run:
        """This run followed by (a ``weight`` fraction of) a bucket; a new run if it falls on the other side.

        A bucket exactly as forecast (nothing asked for, nothing due) ends the run: it is no news either way.
        """
        if observed == expected:
            return Run()
        below = observed < expected
        base = self if below == self.below and self.buckets > 0 else Run(below)
        return Run(below, base.observed + observed, base.expected + expected, base.offsets + weight * offset,
                   base.buckets + weight)

    def changed(self, nats: float) -> bool:
        return nats > 0.0 and self.buckets > 0 and surprise(self.observed, self.expected) > nats

    def level(self) -> float:
        """The level the run says: its requests per bucket, less its buckets' seasonal offsets."""
        return (self.observed - self.offsets) / self.buckets


class Forecaster(Protocol):
    """Learns from completed buckets and predicts the counts of the buckets that follow."""

    def update(self, counts: Iterable[float]) -> None:
        """Feed completed buckets, oldest first."""

    def predict(self, horizon: int) -> list[float]:
        """Expected counts of the next ``horizon`` buckets (never negative)."""

    def quiet(self, count: float, fraction: float) -> float:
        """How much quieter than forecast the model has been lately, in nats (0: not quieter).

        The surprise of the buckets since the forecast last crossed the counts, the bucket in
        progress (``count`` so far, ``fraction`` elapsed) included, when they fall short of it.
        """

    def outlook(self, horizon: int, count: float, fraction: float) -> float:
        """Requests expected from now to the end of the ``horizon`` buckets after the one in progress.

        The bucket in progress has ``count`` so far with ``fraction`` of it elapsed: its likely total
        (``count`` plus the forecast's share of the rest) is learnt provisionally, so a surge shows
        before its bucket closes. The state is left unchanged.
        """


@dataclass(slots=True)
class Holt:
    """Holt's linear (double exponential) smoothing: a level and a trend, updated once per bucket.

    With ``change_nats`` > 0 it also watches for a change of regime: when the buckets since the
    forecast last crossed the counts (the bucket in progress included, pro rata) are less likely
    than ``exp(-change_nats)`` under it (Poisson), the level restarts at their rate and the trend at
    zero, instead of catching up bucket by bucket (a model whose phase ended stops being forecast
    busy within a bucket or two; one whose phase began is forecast busy as soon).
    """

    alpha: float = 0.5
    beta: float = 0.1
    level: float = 0.0
    trend: float = 0.0
    seen: int = 0
    change_nats: float = 0.0
    run: Run = field(default_factory=Run)

    def update(self, counts: Iterable[float]) -> None:
        for x in counts:
            x = float(x)
            if self.seen:
                self.run = self.run.extend(x, max(0.0, self.level + self.trend), 0.0)
            self.level, self.trend = self._step(x, 1.0)
            if self.run.changed(self.change_nats):
                self.level, self.trend, self.run = max(0.0, self.run.level()), 0.0, Run()
            self.seen += 1

    def _step(self, count: float, fraction: float) -> tuple[float, float]:
        """Level and trend after a bucket with ``count`` so far and ``fraction`` of it elapsed."""
        expected = max(0.0, self.level + self.trend)
        if self.seen == 0:
            return count + (1.0 - fraction) * expected, 0.0
        x = count + (1.0 - fraction) * expected
        level = self.alpha * x + (1 - self.alpha) * (self.level + self.trend)
        return level, self.beta * (level - self.level) + (1 - self.beta) * self.trend

    def predict(self, horizon: int) -> list[float]:
        return [max(0.0, self.level + h * self.trend) for h in range(1, horizon + 1)]

    def quiet(self, count: float, fraction: float) -> float:
        due = max(0.0, self.level + self.trend) if self.seen else 0.0
        return _quiet(self.run, count, fraction, due, 0.0)

    def outlook(self, horizon: int, count: float, fraction: float) -> float:
        due = max(0.0, self.level + self.trend) if self.seen else 0.0
        if self.seen and fraction > 0.0:
            run = self.run.extend(count, fraction * due, 0.0, fraction)
            if run.changed(self.change_nats):
                level = max(0.0, run.level())
                return (1.0 - fraction) * level + horizon * level
        level, trend = self._step(count, fraction)
        return (1.0 - fraction) * due + _linear_sum(level, trend, horizon)


@dataclass(slots=True)
class HoltWinters:
    """Additive Holt-Winters: Holt's level and trend plus a seasonal offset per bucket of the cycle.

    Offsets are read through a moving average of ``2·smooth + 1`` buckets, as counts per bucket are
    too noisy to trust one by one. The first cycle initialises the level (its mean) and the
    offsets (each bucket's distance from it); until then it forecasts like :class:`Holt`.
    """

    season: int
    alpha: float = 0.5
    beta: float = 0.1
    gamma: float = 0.3
    smooth: int = 2
    level: float = 0.0
    trend: float = 0.0
    offsets: list[float] = field(default_factory=list)
    seen: int = 0
    change_nats: float = 0.0  # as Holt's: a run of buckets this surprising restarts the level
    run: Run = field(default_factory=Run)
    _first: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.season < 2:
            raise ValueError("a season needs at least 2 buckets")

    def offset(self, j: int) -> float:
        """The seasonal offset of cycle bucket ``j``, averaged with its neighbours."""
        w = min(self.smooth, (self.season - 1) // 2)
        return sum(self.offsets[(j + d) % self.season] for d in range(-w, w + 1)) / (2 * w + 1)

    def update(self, counts: Iterable[float]) -> None:
        for x in counts:
            x = float(x)
            if not self.offsets:
                if self.seen:
                    self.run = self.run.extend(x, max(0.0, self.level + self.trend), 0.0)
                self._warm_up(x)
                if self.run.changed(self.change_nats) and self._first:
                    self.level, self.trend, self.run = max(0.0, self.run.level()), 0.0, Run()
            else:
                i = self.seen % self.season
                here = self.offset(i)
                self.run = self.run.extend(x, max(0.0, self.level + self.trend + here), here)
                previous = self.level
                self.level = self.alpha * (x - here) + (1 - self.alpha) * (previous + self.trend)
                self.trend = self.beta * (self.level - previous) + (1 - self.beta) * self.trend
                if self.run.changed(self.change_nats):
                    self.level, self.trend, self.run = self.run.level(), 0.0, Run()
                self.offsets[i] = self.gamma * (x - self.level) + (1 - self.gamma) * self.offsets[i]
            self.seen += 1

    def _warm_up(self, x: float) -> None:
        self._first.append(x)
        if self.seen == 0:
            self.level = x
        else:
            previous = self.level
            self.level = self.alpha * x + (1 - self.alpha) * (previous + self.trend)
            self.trend = self.beta * (self.level - previous) + (1 - self.beta) * self.trend
        if len(self._first) == self.season:
            mean = sum(self._first) / self.season
            self.offsets = [v - mean for v in self._first]
            self.level, self.trend = mean, 0.0
            self._first = []
            self.run = Run()

    def predict(self, horizon: int) -> list[float]:
        if not self.offsets:
            return [max(0.0, self.level + h * self.trend) for h in range(1, horizon + 1)]
        return [max(0.0, self.level + h * self.trend + self.offset(self.seen + h - 1)) for h in range(1, horizon + 1)]

    def quiet(self, count: float, fraction: float) -> float:
        if not self.offsets:
            return Holt(self.alpha, self.beta, self.level, self.trend, self.seen, self.change_nats, self.run).quiet(
                count, fraction)
        here = self.offset(self.seen % self.season)
        return _quiet(self.run, count, fraction, max(0.0, self.level + self.trend + here), here)

    def outlook(self, horizon: int, count: float, fraction: float) -> float:
        if not self.offsets:
            holt = Holt(self.alpha, self.beta, self.level, self.trend, self.seen, self.change_nats, self.run)
            return holt.outlook(horizon, count, fraction)
        i = self.seen % self.season
        here = self.offset(i)
        due = max(0.0, self.level + self.trend + here)
        run = self.run.extend(count, fraction * due, fraction * here, fraction) if fraction > 0.0 else None
        if run is not None and run.changed(self.change_nats):
            level, trend = run.level(), 0.0
            rest = (1.0 - fraction) * max(0.0, level + here)
        else:
            rest = (1.0 - fraction) * due
            level = self.alpha * (count + rest - here) + (1 - self.alpha) * (self.level + self.trend)
            trend = self.beta * (level - self.level) + (1 - self.beta) * self.trend
        return rest + sum(max(0.0, level + h * trend + self.offset(i + h)) for h in range(1, horizon + 1))


def _quiet(run: Run, count: float, fraction: float, due: float, offset: float) -> float:
    """The surprise (nats) of the run below the forecast, the bucket in progress included; 0 when not below."""
    if fraction > 0.0:
        run = run.extend(count, fraction * due, fraction * offset, fraction)
    return surprise(run.observed, run.expected) if run.below and run.buckets > 0 else 0.0


def _linear_sum(level: float, trend: float, horizon: int) -> float:
    """``sum(max(0, level + h * trend) for h in 1..horizon)`` without the loop when nothing is clamped."""
    if level + trend >= 0.0 and level + horizon * trend >= 0.0:
        return horizon * level + trend * horizon * (horizon + 1) / 2
    return sum(max(0.0, level + h * trend) for h in range(1, horizon + 1))


def make_forecaster(settings: SchedulerSettings) -> Forecaster:
    """A fresh forecaster as configured (``scheduler.forecaster``, ``alpha``, ``beta``, ``gamma``, ``season_s``)."""
    season = round(settings.season_s / settings.bucket_s)
    nats = -math.log(settings.change_p) if settings.change_p > 0.0 else 0.0
    if settings.forecaster == "seasonal" and season >= 2:
        return HoltWinters(season=season, alpha=settings.alpha, beta=settings.beta, gamma=settings.gamma,
                           change_nats=nats)
    return Holt(alpha=settings.alpha, beta=settings.beta, change_nats=nats)
