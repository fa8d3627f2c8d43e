"""CPU seconds of processes from /proc, and the control plane's energy share in a strategy's report."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from calm.bench import cputime
from calm.report import control_plane
from calm.roles import ROLES

linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


@linux_only
def test_own_cpu_seconds_grow_with_work() -> None:
    before = cputime.process_cpu_s(os.getpid())
    assert before is not None
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    after = cputime.process_cpu_s(os.getpid())
    assert after is not None and after - before >= 0.2


def test_a_command_name_with_spaces_and_parentheses_is_parsed(tmp_path: Path) -> None:
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    (tmp_path / "42").mkdir()
    rest = ["S", "1", "1", "1", "0", "-1", "4194560", "0", "0", "0", "0", str(3 * ticks), str(ticks), "0", "0"]
    (tmp_path / "42" / "stat").write_text("42 (a) b (c)) " + " ".join(rest) + "\n")
    assert cputime.process_cpu_s(42, tmp_path) == pytest.approx(4.0)
    assert cputime.process_cpu_s(43, tmp_path) is None, "a process that is gone reads as None"


def test_a_restarted_process_is_left_out() -> None:
    before = {"monitor": (10, 1.0), "worker-1": (11, 5.0)}
    after = {"monitor": (10, 1.5), "worker-1": (99, 0.2)}
    assert cputime.used_between(before, after) == {"monitor": 0.5}


@linux_only
def test_snapshot_reads_live_processes_only() -> None:
    snap = cputime.snapshot({"me": os.getpid(), "gone": 2**22 + 17})
    assert set(snap) == {"me"} and snap["me"][0] == os.getpid()


def test_control_plane_share_is_actor_seconds_times_watts_per_reply() -> None:
    cpu = {role: 0.5 for role in ROLES} | {"worker-1": 9.0}
    out = control_plane(cpu, ROLES, replied=10, inference_j=0.2, watts_per_core=15.0)
    assert out["control_cpu_s"] == pytest.approx(0.5 * len(ROLES))
    assert out["control_energy_j_per_query"] == pytest.approx(0.5 * len(ROLES) * 15.0 / 10)
    assert out["energy_all_in_j_per_query"] == pytest.approx(0.2 + 0.5 * len(ROLES) * 15.0 / 10)


def test_control_plane_is_unknown_when_an_actor_was_not_measured() -> None:
    cpu = {role: 0.5 for role in ROLES[1:]}
    assert control_plane(cpu, ROLES, 10, 0.2, 15.0)["energy_all_in_j_per_query"] is None
    assert control_plane({r: 0.5 for r in ROLES}, ROLES, 0, 0.2, 15.0)["control_energy_j_per_query"] is None
    assert control_plane({r: 0.5 for r in ROLES}, (), 10, 0.2, 15.0)["control_cpu_s"] is None
