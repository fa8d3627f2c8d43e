"""`calm fleet evaluate`: held-out quality measured again on a fleet's eval sets and written into its cards."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from workers.fleet import load_fleet, write_fleet
from workers.fleet.evaluate import evaluate_fleet
from workers.fleet.spec import FleetError


def _copy(tiny_fleet: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "fleet"
    shutil.copytree(tiny_fleet, copy, symlinks=True)
    return copy


def test_a_card_without_quality_gets_it_measured_and_the_others_are_left_alone(tiny_fleet: Path,
                                                                               tmp_path: Path) -> None:
    copy = _copy(tiny_fleet, tmp_path)
    fleet = load_fleet(copy)
    built = {c.name: dict(c.quality) for c in fleet.models}
    stripped = tuple(dataclasses.replace(c, quality={"note": 1.0}) if c.name == "arith" else c for c in fleet.models)
    write_fleet(dataclasses.replace(fleet, models=stripped))

    after = {c.name: dict(c.quality) for c in evaluate_fleet(copy, models=["arith"], threads=1).models}

    # greedy decoding of the same eval set: the builder's figure again, now with its standard error
    assert after["arith"]["arithmetic.exact_match"] == pytest.approx(built["arith"]["arithmetic.exact_match"])
    assert 0 < after["arith"]["arithmetic.exact_match_se"] < 0.1
    assert after["arith"]["note"] == 1.0  # not a domain of the card: kept
    assert after["sort"] == built["sort"] and after["generalist"] == built["generalist"]
    assert {c.name: dict(c.quality) for c in load_fleet(copy).models} == after  # written to fleet.toml


def test_unknown_models_are_refused_and_nothing_is_written(tiny_fleet: Path, tmp_path: Path) -> None:
    copy = _copy(tiny_fleet, tmp_path)
    before = (copy / "fleet.toml").read_text()
    with pytest.raises(FleetError, match="no model named 'nope'"):
        evaluate_fleet(copy, models=["arith", "nope"])
    assert (copy / "fleet.toml").read_text() == before


def test_cli_prints_each_measured_card(tiny_fleet: Path, tmp_path: Path) -> None:
    copy = _copy(tiny_fleet, tmp_path)
    done = subprocess.run([sys.executable, "-m", "calm", "fleet", "evaluate", "--fleet", str(copy), "--models", "sort"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    name, quality = done.stdout.strip().split(" ", 1)
    assert name == "sort" and "sorting.exact_match_se" in json.loads(quality)
    bad = subprocess.run([sys.executable, "-m", "calm", "fleet", "evaluate", "--fleet", str(copy), "--models", "x"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "no model named 'x'" in bad.stderr
