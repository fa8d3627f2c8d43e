"""``calm demo`` end to end on the tiny fleet: a report whose every figure comes from recorded replies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from calm.report import percentile, quality_of
from calm.roles import ROLES
from workers.energy import DEFAULT_WATTS_PER_CORE

pytestmark = pytest.mark.slow
STATS = ("queries", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "energy_j_per_query", "energy_source",
         "quality", "route_ms_p50", "route_ms_p99", "cache_hits", "cold_loads")


def test_demo_writes_a_report_from_measured_replies(tiny_fleet: Path, redis_url: str, prefix: str,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "report"
    env = {**os.environ, "CALM_REDIS_URL": redis_url, "CALM_PREFIX": prefix}
    proc = subprocess.run(
        [sys.executable, "-m", "calm", "demo", "--fleet", str(tiny_fleet), "--queries", "24", "--rate", "6",
         "--out", str(out)], capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out), "the last line names the report directory"
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().count("| calm |") >= 1
    assert set(report["strategies"]) == {"calm", "single"}
    assert {"machine", "fleet"} <= set(report)
    rows = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    for name, strategy in report["strategies"].items():
        mine = [r for r in rows if r["strategy"] == name]
        assert len(mine) == 24 and all(r["reply"] and r["reply"]["status"] == "ok" for r in mine), name
        overall = strategy["overall"]
        for key in STATS:
            assert key in overall, key
        latencies = [float(r["reply"]["latency_ms"]) for r in mine]
        assert overall["latency_p50_ms"] == percentile(latencies, 50)
        assert overall["latency_p99_ms"] == percentile(latencies, 99)
        energy = sum(float(r["reply"]["energy_j"]) for r in mine) / len(mine)
        assert overall["energy_j_per_query"] == pytest.approx(energy, rel=1e-3)
        control = sum(overall["cpu_s"][role] for role in ROLES) * DEFAULT_WATTS_PER_CORE / len(mine)
        assert control > 0, "the control plane's processes were measured"
        assert overall["control_energy_j_per_query"] == pytest.approx(control, rel=1e-3, abs=1e-5)
        assert overall["energy_all_in_j_per_query"] == pytest.approx(energy + control, rel=1e-3, abs=1e-5)
        assert overall["cpu_s"]["worker-1"] > 0
        quality = [quality_of(r["domain"], r["reply"]["text"], r["reference"]) for r in mine]
        assert overall["quality"] == pytest.approx(sum(quality) / len(quality), abs=1e-4)
        for domain, stats in strategy["domains"].items():
            assert stats["queries"] == sum(1 for r in mine if r["domain"] == domain)
    single = report["strategies"]["single"]["overall"]["routed"]
    assert list(single) == [report["fleet"]["baseline"]], "single pins every query to the baseline"
    assert "calm" in report["comparison"]
