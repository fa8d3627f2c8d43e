"""``calm bench soak`` on the tiny fleet for a few seconds: the report's structure, and a verdict made of samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.config import Settings
from calm.bench.soak import SoakOptions, slope_per_min, stream_limit, verdict
from calm.roles import ROLES
from tests.conftest import _cleanup

pytestmark = pytest.mark.slow
SAMPLE_S = 2.0


def test_a_short_soak_writes_samples_and_a_verdict_drawn_from_them(tiny_fleet: Path, redis_url: str, prefix: str,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "soak"
    env = {**os.environ, "CALM_REDIS_URL": redis_url, "CALM_PREFIX": prefix}
    try:
        run = subprocess.run([sys.executable, "-m", "calm", "bench", "soak", "--minutes", "0.2", "--rate", "4",
                              "--sample-s", str(SAMPLE_S), "--fleet", str(tiny_fleet), "--out", str(out)],
                             capture_output=True, text=True, env=env, timeout=600)
    finally:
        _cleanup(redis_url, prefix)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == str(out)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    soak, samples, found = report["soak"], report["samples"], report["verdict"]
    assert soak["sent"] == int(0.2 * 60 * 4) and soak["replied"] == soak["sent"] and soak["unanswered"] == 0
    assert soak["duplicate_replies"] == 0
    assert len(samples) >= 3 and samples[-1]["replied"] == soak["replied"]
    assert [s["t_s"] for s in samples] == sorted(s["t_s"] for s in samples)
    for sample in samples:
        roles = {key.split(":")[0] for key in sample["rss_mb"]}
        assert roles == {*ROLES, "worker"}, roles
        assert all(mb > 0 for mb in sample["rss_mb"].values())
        assert set(sample["rss_mb"]) == set(sample["pids"])
        assert "queries" in sample["xlen"] or sample is samples[0]
    options = SoakOptions(minutes=0.2, rate_qps=4, sample_s=SAMPLE_S)
    assert found == verdict(samples, Settings(), options), "the verdict is a function of the samples"
    for key, proc in found["processes"].items():
        series = [(s["t_s"], s["rss_mb"][key]) for s in samples if key in s["rss_mb"]]
        assert proc["rss_start_mb"] == series[0][1] and proc["rss_end_mb"] == series[-1][1]
        half = [(t, v) for t, v in series if t >= samples[-1]["t_s"] / 2]
        expected = slope_per_min(half)
        assert proc["second_half_slope_mb_per_min"] == (None if expected is None else round(expected, 3))
    for name, stream in found["streams"].items():
        assert stream["max_len"] == max(s["xlen"].get(name, 0) for s in samples)
        assert stream["maxlen"] == stream_limit(name, Settings())
    assert found["streams"]["queries"]["max_len"] == soak["sent"]
    assert found["ok"] == (not found["problems"])
    print(f"soak: {soak}; processes {found['processes']}; problems {found['problems']}")
