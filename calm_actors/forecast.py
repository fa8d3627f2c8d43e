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

    def bucket(self, t_s: float) -> int:
        return math.floor(t_s / self.bucket_s)

    def add(self, model: str, t_s: float, n: int = 1) -> None:
        """Count ``n`` requests for ``model`` at time ``t_s``."""
        buckets = self._counts.setdefault(model, {})
        b = self.bucket(t_s)
        buckets[b] = buckets.get(b, 0) + n
        self._totals[model] = self._totals.get(model, 0) + n
        self.version += 1

    def set(self, model: str, buckets: Mapping[int, int]) -> None:
        """Replace ``model``'s history (the live scheduler copies it from the knowledge base)."""
        self._counts[model] = dict(buckets)
        self._totals[model] = sum(buckets.values())
        self.version += 1

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


class Forecaster(Protocol):
    """Learns from completed buckets and predicts the counts of the buckets that follow."""

    def update(self, counts: Iterable[float]) -> None:
        """Feed completed buckets, oldest first."""

    def predict(self, horizon: int) -> list[float]:
        """Expected counts of the next ``horizon`` buckets (never negative)."""

    def outlook(self, horizon: int, count: float, fraction: float) -> float:
        """Requests expected from now to the end of the ``horizon`` buckets after the one in progress.

        The bucket in progress has ``count`` so far with ``fraction`` of it elapsed: its likely total
        (``count`` plus the forecast's share of the rest) is learnt provisionally, so a surge shows
        before its bucket closes. The state is left unchanged.
        """


@dataclass(slots=True)
class Holt:
    """Holt's linear (double exponential) smoothing: a level and a trend, updated once per bucket."""

    alpha: float = 0.5
    beta: float = 0.1
    level: float = 0.0
    trend: float = 0.0
    seen: int = 0

    def update(self, counts: Iterable[float]) -> None:
        for x in counts:
            self.level, self.trend = self._step(float(x), 1.0)
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

    def outlook(self, horizon: int, count: float, fraction: float) -> float:
        rest = (1.0 - fraction) * max(0.0, self.level + self.trend) if self.seen else 0.0
        level, trend = self._step(count, fraction)
        return rest + _linear_sum(level, trend, horizon)


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
                self._warm_up(x)
            else:
                i = self.seen % self.season
                previous = self.level
                self.level = self.alpha * (x - self.offset(i)) + (1 - self.alpha) * (previous + self.trend)
                self.trend = self.beta * (self.level - previous) + (1 - self.beta) * self.trend
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

    def predict(self, horizon: int) -> list[float]:
        if not self.offsets:
            return [max(0.0, self.level + h * self.trend) for h in range(1, horizon + 1)]
        return [max(0.0, self.level + h * self.trend + self.offset(self.seen + h - 1)) for h in range(1, horizon + 1)]

    def outlook(self, horizon: int, count: float, fraction: float) -> float:
        if not self.offsets:
            return Holt(self.alpha, self.beta, self.level, self.trend, self.seen).outlook(horizon, count, fraction)
        i = self.seen % self.season
        here = self.offset(i)
        rest = (1.0 - fraction) * max(0.0, self.level + self.trend + here)
        level = self.alpha * (count + rest - here) + (1 - self.alpha) * (self.level + self.trend)
        trend = self.beta * (level - self.level) + (1 - self.beta) * self.trend
        return rest + sum(max(0.0, level + h * trend + self.offset(i + h)) for h in range(1, horizon + 1))


def _linear_sum(level: float, trend: float, horizon: int) -> float:
    """``sum(max(0, level + h * trend) for h in 1..horizon)`` without the loop when nothing is clamped."""
    if level + trend >= 0.0 and level + horizon * trend >= 0.0:
        return horizon * level + trend * horizon * (horizon + 1) / 2
    return sum(max(0.0, level + h * trend) for h in range(1, horizon + 1))


def make_forecaster(settings: SchedulerSettings) -> Forecaster:
    """A fresh forecaster as configured (``scheduler.forecaster``, ``alpha``, ``beta``, ``gamma``, ``season_s``)."""
    season = round(settings.season_s / settings.bucket_s)
    if settings.forecaster == "seasonal" and season >= 2:
        return HoltWinters(season=season, alpha=settings.alpha, beta=settings.beta, gamma=settings.gamma)
    return Holt(alpha=settings.alpha, beta=settings.beta)
