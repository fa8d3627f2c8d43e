"""``calm bench routing``: offline routing accuracy on held-out prompts, by classifier, exemplars and cards."""

from __future__ import annotations

import json
import re
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
    assert report["embed_tokens"] == 16  # the monitor's default cut


def test_the_cli_routes_with_the_configured_cut(tiny_fleet: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "calm", "bench", "routing", "--fleet", str(tiny_fleet),
                           "--limit", "10", "--json", "--set", "ingress.embed_tokens=64"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["embed_tokens"] == 64


def test_a_held_out_draw_routes_fresh_prompts_of_each_domain(tiny_fleet: Path) -> None:
    from calm.bench.routing import DrawError, drawn_prompts, eval_prompts
    from workers.fleet.spec import load_fleet

    fleet = load_fleet(tiny_fleet)
    drawn = drawn_prompts(fleet, 50, seed=7)
    own = eval_prompts(fleet)
    assert set(drawn) == set(own) == {"arithmetic", "sorting"}
    for domain, prompts in drawn.items():
        assert len(prompts) == len(set(prompts)) == 50
        assert not set(prompts) & set(own[domain])  # none of the fleet's own eval prompts
    assert drawn_prompts(fleet, 50, seed=7) == drawn  # seeded
    with pytest.raises(DrawError, match="positive"):
        drawn_prompts(fleet, 0, seed=7)
    assert drawn_prompts(fleet, 50, seed=8) != drawn
    report = run(tiny_fleet, draw=50, draw_seed=7)
    assert report["prompts"] == {"source": "held-out draw", "per_domain": 50, "seed": 7}
    for variant in report["routing"].values():
        assert {d: s["queries"] for d, s in variant["domains"].items()} == {"arithmetic": 50, "sorting": 50}


def test_a_draw_needs_a_fleet_built_from_a_known_recipe(tiny_fleet: Path, tmp_path: Path) -> None:
    import shutil

    from calm.bench.routing import DrawError, drawn_prompts
    from workers.fleet.spec import load_fleet

    copy = tmp_path / "fleet"
    shutil.copytree(tiny_fleet, copy, symlinks=True)
    toml = copy / "fleet.toml"
    text, n = re.subn(r'recipe_hash = "[0-9a-f]+"', f'recipe_hash = "{"0" * 64}"', toml.read_text())
    assert n == 1
    toml.write_text(text)  # as if built by hand, or from a recipe this version does not know
    with pytest.raises(DrawError, match="known profile"):
        drawn_prompts(load_fleet(copy), 10, seed=1)
    done = subprocess.run([sys.executable, "-m", "calm", "bench", "routing", "--fleet", str(copy), "--draw", "10"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "known profile" in done.stderr

