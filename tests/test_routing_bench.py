"""``calm bench routing``: offline routing accuracy on held-out prompts, by classifier, exemplars and cards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from calm.bench.routing import run

pytestmark = pytest.mark.slow


def test_routing_report_counts_every_held_out_prompt(tiny_fleet: Path) -> None:
    report = run(tiny_fleet, limit=120)
    assert set(report["routing"]) == {"classifier", "exemplars", "card_only"}
    assert report["fleet"]["exemplars"]["arith"] >= 32
    for variant in report["routing"].values():
        assert set(variant["domains"]) == {"arithmetic", "sorting"}
        for stats in variant["domains"].values():
            assert stats["queries"] == 120
            assert sum(stats["routed"].values()) == stats["queries"]
            assert len(stats["misrouted"]) == min(5, stats["queries"] - stats["correct"])  # examples, capped
            assert stats["accuracy"] == pytest.approx(stats["correct"] / stats["queries"], abs=1e-4)
        assert variant["queries"] == 240
    # the two tiny domains look nothing alike: exemplar routing sends (nearly) every prompt home
    assert report["routing"]["exemplars"]["min_domain_accuracy"] >= 0.95
    assert report["routing"]["classifier"]["min_domain_accuracy"] >= 0.95


def test_cli_prints_json(tiny_fleet: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "calm", "bench", "routing", "--fleet", str(tiny_fleet),
                           "--limit", "20", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["routing"]["exemplars"]["queries"] == 40
    assert report["routing"]["classifier"]["queries"] == 40
