"""Entry points of the long-running processes: one actor role, or one worker."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from broker.config import Settings
from broker.runtime import SUPERVISOR_PID_ENV, ProcessRuntime, announce_ready
from calm_actors import analyzer, executor, monitor, planner, scheduler

log = logging.getLogger(__name__)
ROLES = ("monitor", "analyzer", "planner", "executor", "scheduler")


def _starter(role: str, fleet: Path | None) -> Callable[[ProcessRuntime], Awaitable[Any]]:
    if role == "monitor":
        if fleet is None:
            raise ValueError("the monitor needs a fleet (its embedder)")
        return lambda rt: monitor.start(rt, fleet)
    starters: dict[str, Callable[[ProcessRuntime], Awaitable[Any]]] = {
        "analyzer": analyzer.start, "planner": planner.start, "executor": executor.start,
        "scheduler": scheduler.start,
    }
    return starters[role]


async def serve_actor(role: str, settings: Settings, url: str, fleet: Path | None) -> int:
    """Run one actor until SIGTERM; returns the exit code."""
    rt = ProcessRuntime(role, settings, url)
    _stop_with_supervisor(rt)
    await _starter(role, fleet)(rt)
    await rt.serve(on_ready=lambda: announce_ready(role))
    return 1 if rt.failed else 0


async def serve_worker(settings: Settings, url: str, fleet_dir: Path) -> int:
    """Run one worker until SIGTERM; returns the exit code."""
    from workers import worker
    from workers.fleet.spec import load_fleet

    fleet = load_fleet(fleet_dir, require_model_files=False)  # a broken model fails its own load, not the worker
    rt = ProcessRuntime("worker", settings, url, instance=settings.worker.worker_id)
    _stop_with_supervisor(rt)
    await worker.start(rt, fleet)
    await rt.serve(on_ready=lambda: announce_ready("worker"))
    return 1 if rt.failed else 0


def _stop_with_supervisor(rt: ProcessRuntime) -> None:
    """Started by a supervisor (``CALM_SUPERVISOR_PID`` names our parent): stop when it is gone."""
    raw = os.environ.get(SUPERVISOR_PID_ENV, "")
    if raw.isdigit() and int(raw) == os.getppid():  # an inherited variable that names someone else is ignored
        rt.stop_with_parent(int(raw))
