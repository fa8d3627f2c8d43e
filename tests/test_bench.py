"""``calm bench`` end to end on the tiny fleet: the report's structure, and figures from recorded replies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from calm.report import percentile, quality_of

pytestmark = pytest.mark.slow


def run_calm(args: list[str], redis_url: str, prefix: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CALM_REDIS_URL": redis_url, "CALM_PREFIX": prefix}
    return subprocess.run([sys.executable, "-m", "calm", *args], capture_output=True, text=True, timeout=900, env=env)


def test_bench_runs_every_strategy_on_the_same_workload(tiny_fleet: Path, redis_url: str, prefix: str,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = run_calm(["bench", "--fleet", str(tiny_fleet), "--strategies", "single,random,semantic,calm",
                     "--queries", "16", "--rate", "8", "--workload", "shift", "--out", str(out)], redis_url, prefix)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    report = json.loads((out / "report.json").read_text())
    assert list(report["strategies"]) == ["single", "random", "semantic", "calm"]
    assert set(report["comparison"]) == {"random", "semantic", "calm"}
    rows = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    prompts = {s: [r["prompt"] for r in rows if r["strategy"] == s] for s in report["strategies"]}
    assert len({tuple(p) for p in prompts.values()}) == 1, "every strategy saw the same workload"
    for name, strategy in report["strategies"].items():
        mine = [r for r in rows if r["strategy"] == name]
        assert strategy["overall"]["queries"] == len(mine) == 16
        assert strategy["overall"]["replied"] == 16
        route = [float(r["reply"]["route_ms"]) for r in mine if r["reply"]["status"] == "ok"]
        assert strategy["overall"]["route_ms_p99"] == percentile(route, 99)
    assert list(report["strategies"]["single"]["overall"]["routed"]) == [report["fleet"]["baseline"]]
    # route_ms's stages and the paired quality come from the same recorded replies.
    calm_rows = [r for r in rows if r["strategy"] == "calm" and r["reply"]["cached"] == "0"]
    split = report["strategies"]["calm"]["overall"]["route_split_ms_p50"]
    assert split["embed"] == percentile([float(r["reply"]["at_embedded_ms"]) - float(r["reply"]["at_monitor_ms"])
                                         for r in calm_rows], 50)
    by_domain: dict[str, list[float]] = {}
    single_rows = [r for r in rows if r["strategy"] == "single"]
    for base, mine in zip(single_rows, [r for r in rows if r["strategy"] == "calm"], strict=True):
        pair = [quality_of(base["domain"], r["reply"]["text"] if r["reply"]["status"] == "ok" else "", r["reference"])
                for r in (base, mine)]
        by_domain.setdefault(base["domain"], []).append(pair[1] - pair[0])
    for domain, diffs in by_domain.items():
        paired = report["comparison"]["calm"]["domains"][domain]["quality_paired"]
        assert paired["n"] == len(diffs)
        assert paired["diff"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-4)


def test_bench_overhead_reports_the_contract_keys(tiny_fleet: Path, redis_url: str, prefix: str,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "overhead"
    proc = run_calm(["bench", "overhead", "--fleet", str(tiny_fleet), "--rates", "50,200", "--seconds", "1",
                     "--burst", "200", "--out", str(out)], redis_url, prefix)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    keys = {"route_ms_p50_at_200qps", "route_ms_p99_at_200qps", "cache_hit_qps_max", "broker_hop_ms_p50"}
    assert keys <= set(report["overhead"])
    assert report["burst"]["answered"] == 200
    saturated = report["burst"]["saturated_qps"]
    assert saturated is not None and saturated > 0
    assert report["overhead"]["cache_hit_qps_max"] == saturated
    assert all(r["answered"] == r["sent"] and r["cached"] == r["sent"] for r in report["rates"])
