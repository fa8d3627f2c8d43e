"""CPU seconds used by the system's processes, read from /proc (Linux); None where it cannot be read."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int, proc_root: Path = Path("/proc")) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (its threads included); None if unreadable."""
    try:
        raw = (proc_root / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields that follow start after the last ")".
    fields = raw[raw.rfind(")") + 2:].split()
    try:
        return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime, stime (fields 14 and 15 of stat)
    except (IndexError, ValueError):
        return None


def snapshot(pids: Mapping[str, int], proc_root: Path = Path("/proc")) -> dict[str, tuple[int, float]]:
    """(pid, CPU seconds so far) of each named process that can be read."""
    out: dict[str, tuple[int, float]] = {}
    for name, pid in pids.items():
        value = process_cpu_s(pid, proc_root)
        if value is not None:
            out[name] = (pid, value)
    return out


def used_between(before: Mapping[str, tuple[int, float]], after: Mapping[str, tuple[int, float]]) -> dict[str, float]:
    """CPU seconds each process used between two snapshots; a process restarted in between (new pid) is left out."""
    return {name: round(after[name][1] - cpu, 3) for name, (pid, cpu) in before.items()
            if name in after and after[name][0] == pid}
