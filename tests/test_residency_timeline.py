"""Residency as recorded by a live run: intervals, cold-load counts and the timeline plot, from worker events."""

from __future__ import annotations

from pathlib import Path

import pytest

from calm.bench.events import Residency, cold_load_counts, residency_intervals
from calm.loadgen import Run
from calm.workload import Item

PNG = b"\x89PNG\r\n\x1a\n"


def ev(at_ms: float, event: str, model: str = "", worker: str = "w1", detail: str = "") -> dict[str, object]:
    return {"at_ms": at_ms, "worker": worker, "event": event, "model": model, "detail": detail, "memory_mb": 1.0}


EVENTS = [
    ev(0, "registered"),
    ev(100, "loaded", "arith"),
    ev(150, "loaded", "arith", detail="already loaded"),
    ev(200, "loaded", "sort", worker="w2"),
    ev(1000, "evicted", "arith", detail="to make room for generalist"),
    ev(1100, "loaded", "generalist"),
    ev(1200, "load_failed", "sort", detail="sort needs ~5.0 MB; 10.0 of 10 MB in use"),
    ev(3000, "evicted", "generalist", detail="worker stopping"),
    ev(3000, "stopping"),
]


def test_intervals_pair_loads_with_evictions_and_stops() -> None:
    assert residency_intervals(EVENTS, end_ms=5000) == [
        Residency("w1", "arith", 100, 1000),
        Residency("w2", "sort", 200, 5000),  # never evicted: resident until the run's end
        Residency("w1", "generalist", 1100, 3000),
    ]


def test_cold_load_counts_come_from_decisions_and_worker_events_in_the_window() -> None:
    decided = [{"model": "arith", "loaded": False}, {"model": "arith", "loaded": True},
               {"model": "generalist", "loaded": False}, {"model": "sort", "loaded": True}]
    counts = cold_load_counts(EVENTS, decided, started_ms=120, ended_ms=2000)
    # loads in the window: sort at 200 and generalist at 1100 (not the repeat "already loaded"); one eviction
    # for room (the one as the worker stopped is outside the window and would not count anyway).
    assert counts == {"cold_loads": 2, "cold_load_rate": 0.5, "loads": 2, "evictions": 1, "decisions": 4,
                      "load_failed": 1}
    assert cold_load_counts([], [], 0, 1)["cold_load_rate"] == 0.0


def test_the_live_report_plots_each_runs_residency_from_its_recorded_events(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from calm.plots import write_plots

    items = [Item(t / 2, "arithmetic" if t < 4 else "sorting", "1+1=", "2", 4) for t in range(8)]
    ids = [f"q{i}" for i in range(len(items))]
    replies = {q: {"status": "ok", "latency_ms": "10", "model": "arith"} for q in ids}
    run = Run("calm", items, ids, replies, started_ms=90.0, ended_ms=4000.0, events=list(EVENTS))
    quiet = Run("single", items, ids, replies, started_ms=90.0, ended_ms=4000.0)  # recorded no events
    report = {"strategies": {s: {"domains": {"arithmetic": {"quality": 1.0, "energy_j_per_query": 0.1}}}
                             for s in ("calm", "single")}}
    written = write_plots(tmp_path, report, [run, quiet])
    timeline = tmp_path / "residency-calm.png"
    assert timeline in written and not (tmp_path / "residency-single.png").exists()
    assert timeline.read_bytes().startswith(PNG) and timeline.stat().st_size > 5000
