"""``calm bench residency --live``: one phase-shift trace on the live system under lru and forecast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FAST = ("scheduler.interval_ms=500", "scheduler.bucket_s=2", "scheduler.horizon_s=4", "scheduler.min_residency_s=2",
        "scheduler.worker_timeout_s=4", "streams.reclaim_idle_ms=1500", "executor.attempt_timeout_s=30")
PNG = b"\x89PNG\r\n\x1a\n"


def phase_trace(path: Path) -> list[dict[str, object]]:
    """Three phases of 12 requests, each dominated by a different pair of the tiny fleet's three models."""
    rows: list[dict[str, object]] = []
    for p, (major, minor) in enumerate([("arith", "sort"), ("sort", "generalist"), ("generalist", "arith")]):
        rows += [{"t": round(p * 6 + i * 0.5, 2), "model": major if i % 3 else minor} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


def test_live_cold_loads_per_policy_are_counted_from_recorded_events(tiny_fleet: Path, redis_url: str, prefix: str,
                                                                     tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    rows = phase_trace(trace)
    out = tmp_path / "report"
    args = ["bench", "residency", "--live", "--trace", str(trace), "--fleet", str(tiny_fleet), "--slots", "2",
            "--report-dir", str(out), "--json", *(f"--set={s}" for s in FAST)]
    env = {**os.environ, "CALM_REDIS_URL": redis_url, "CALM_PREFIX": prefix}
    proc = subprocess.run([sys.executable, "-m", "calm", *args], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    report = json.loads((out / "report.json").read_text())
    assert list(report["live"]["policies"]) == ["lru", "forecast"]
    assert list(report["simulated"]["policies"]) == ["lru", "forecast"]
    assert report["trace"]["requests"] == len(rows)
    assert report["capacity"]["budget"] == 2.0 and report["capacity"]["unit"] == "slots"

    lines = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    replies = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    for policy, row in report["live"]["policies"].items():
        assert row["requests"] == row["replied"] == row["decisions"] == len(rows), row
        assert row["errors"] == 0
        mine = [r for r in replies if r["strategy"] == policy]
        assert [r["reply"]["model"] for r in mine] == [r["model"] for r in rows], "each request ran on its model"
        decided = [e for e in lines if e["policy"] == policy and e["kind"] == "decision"]
        assert {d["id"] for d in decided} == {r["id"] for r in mine}
        assert row["cold_loads"] == sum(1 for d in decided if not d["loaded"])
        assert row["cold_load_rate"] == round(row["cold_loads"] / len(rows), 4)
        start, end = row["window_ms"]
        events = [e for e in lines if e["policy"] == policy and e["kind"] == "worker_event"
                  and start <= e["at_ms"] <= end]
        assert row["loads"] == sum(1 for e in events if e["event"] == "loaded" and e["detail"] != "already loaded")
        assert row["evictions"] == sum(1 for e in events if e["event"] == "evicted"
                                       and e["detail"] not in ("worker stopping", "was not loaded"))
        assert row["cold_loads"] >= 1, "nothing is loaded before the first request"
        timeline = out / f"residency-{policy}.png"
        assert timeline.name in report["plots"] and timeline.read_bytes().startswith(PNG)
