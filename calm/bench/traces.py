"""Arrival traces for the residency benchmark: seeded synthetic ones, and a file format for your own.

A trace file is JSONL (one ``{"t": seconds, "model": NAME}`` or ``{"t": seconds, "domain": NAME}``
per line) or CSV with a header naming ``t`` (or ``time``) and ``model`` or ``domain``. Domains are
resolved to the fleet's specialist for that domain (its baseline when no specialist claims it).
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("steady", "phase", "periodic", "burst")


class TraceError(ValueError):
    """A trace file is malformed or names something the fleet lacks."""


@dataclass(frozen=True, slots=True)
class Request:
    t: float  # seconds from any origin
    model: str


@dataclass(frozen=True, slots=True)
class TraceSpec:
    """How to synthesise a trace: ``requests`` arrivals at ``rate`` per second over ``models``.

    ``hot`` models share ``hot_share`` of the traffic (the rest spreads over the others); ``phase``
    draws a new hot set every ``phase_s``; ``periodic`` repeats a cycle of ``period_s`` made of
    ``segments`` parts, each with its own hot set (a daily routine); ``burst`` adds bursts of
    ``burst_rate`` per second, ``burst_s`` long, on a random cold model about every ``burst_every_s``.
    """

    kind: str
    models: tuple[str, ...]
    requests: int = 10_000
    rate: float = 2.0
    hot: int = 3
    hot_share: float = 0.9
    phase_s: float = 600.0
    period_s: float = 1800.0
    segments: int = 4
    burst_every_s: float = 300.0
    burst_s: float = 30.0
    burst_rate: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TraceError(f"unknown trace kind {self.kind!r}; known: {', '.join(KINDS)}")
        if not self.models:
            raise TraceError("a trace needs at least one model")
        if self.requests <= 0 or self.rate <= 0:
            raise TraceError("requests and rate must be > 0")
        if not 0 < self.hot <= len(self.models):
            raise TraceError(f"hot must be within 1..{len(self.models)}")


def generate(spec: TraceSpec) -> list[Request]:
    """A seeded trace of ``spec.requests`` arrivals (Poisson in time; the mix per ``spec.kind``)."""
    rng = random.Random(spec.seed)
    models = list(spec.models)
    if spec.kind == "periodic":
        return _periodic(spec, rng)
    hot = rng.sample(models, spec.hot)
    phase_end = spec.phase_s
    bursts: list[tuple[float, float, str]] = []
    if spec.kind == "burst":
        bursts = _bursts(spec, rng, hot)
    out: list[Request] = []
    t = 0.0
    while len(out) < spec.requests:
        t += rng.expovariate(spec.rate)
        if spec.kind == "phase" and t >= phase_end:
            hot = rng.sample(models, spec.hot)
            phase_end += spec.phase_s
        out.append(Request(round(t, 3), _mix(rng, models, hot, spec.hot_share)))
    for start, end, model in bursts:
        b = start
        while True:
            b += rng.expovariate(spec.burst_rate)
            if b >= end or b > out[-1].t:
                break
            out.append(Request(round(b, 3), model))
    out.sort(key=lambda r: r.t)
    return out[: spec.requests]


def _mix(rng: random.Random, models: list[str], hot: list[str], share: float) -> str:
    """One of the hot models with probability ``share``, else one of the others (uniformly within each)."""
    cold = [m for m in models if m not in hot]
    if not cold or rng.random() < share:
        return rng.choice(hot)
    return rng.choice(cold)


def _bursts(spec: TraceSpec, rng: random.Random, hot: list[str]) -> list[tuple[float, float, str]]:
    span = spec.requests / spec.rate
    cold = [m for m in spec.models if m not in hot] or list(spec.models)
    out = []
    t = rng.expovariate(1 / spec.burst_every_s)
    while t < span:
        out.append((t, t + spec.burst_s, rng.choice(cold)))
        t += spec.burst_s + rng.expovariate(1 / spec.burst_every_s)
    return out


def _periodic(spec: TraceSpec, rng: random.Random) -> list[Request]:
    """A daily-like rhythm: the cycle has ``segments`` parts, each with its own hot set, the same every cycle."""
    plan = [rng.sample(list(spec.models), spec.hot) for _ in range(spec.segments)]
    part = spec.period_s / spec.segments
    out: list[Request] = []
    t = 0.0
    while len(out) < spec.requests:
        t += rng.expovariate(spec.rate)
        hot = plan[int((t % spec.period_s) // part)]
        out.append(Request(round(t, 3), _mix(rng, list(spec.models), hot, spec.hot_share)))
    return out


# -- files -------------------------------------------------------------------------
def read_trace(path: Path, resolve: Callable[[str, str], str]) -> list[Request]:
    """Read a JSONL or CSV trace; ``resolve(kind, name)`` maps a ``model`` or ``domain`` to a fleet model."""
    text = Path(path).read_text(encoding="utf-8")
    rows = _csv_rows(text, path) if _looks_like_csv(path, text) else _jsonl_rows(text, path)
    out = []
    for where, t, kind, name in rows:
        try:
            out.append(Request(float(t), resolve(kind, name)))
        except (TypeError, ValueError) as e:
            raise TraceError(f"{where}: {e}") from e
    if not out:
        raise TraceError(f"{path}: the trace is empty")
    out.sort(key=lambda r: r.t)
    return out


def _looks_like_csv(path: Path, text: str) -> bool:
    if Path(path).suffix.lower() == ".csv":
        return True
    first = next((line for line in text.splitlines() if line.strip()), "")
    return not first.lstrip().startswith("{")


def _jsonl_rows(text: str, path: Path) -> Iterable[tuple[str, Any, str, str]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise TraceError(f"{where}: not JSON: {e}") from e
        if not isinstance(row, dict) or "t" not in row:
            raise TraceError(f'{where}: expected {{"t": seconds, "model" or "domain": NAME}}')
        yield where, row["t"], *_name(row, where)


def _csv_rows(text: str, path: Path) -> Iterable[tuple[str, Any, str, str]]:
    reader = csv.DictReader(text.splitlines())
    fields = [f.strip() for f in reader.fieldnames or []]
    time_key = next((f for f in ("t", "time") if f in fields), None)
    if time_key is None or not {"model", "domain"} & set(fields):
        raise TraceError(f"{path}: a CSV trace needs a header with t (or time) and model or domain")
    for n, raw in enumerate(reader, 2):
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
        where = f"{path}:{n}"
        yield where, row[time_key], *_name(row, where)


def _name(row: dict[str, object], where: str) -> tuple[str, str]:
    for kind in ("model", "domain"):
        value = row.get(kind)
        if value:
            return kind, str(value)
    raise TraceError(f"{where}: needs a model or a domain")


def write_trace(trace: Sequence[Request], path: Path) -> None:
    """Write ``trace`` as JSONL (``{"t", "model"}`` per line)."""
    with Path(path).open("w", encoding="utf-8") as fh:
        for r in trace:
            fh.write(json.dumps({"t": r.t, "model": r.model}) + "\n")
