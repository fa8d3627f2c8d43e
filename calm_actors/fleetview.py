"""A periodically refreshed, read-only view of the KB that the analyzer and planner score against."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker.kb import KnowledgeBase, ModelState, WorkerState
from broker.names import Names


@dataclass(frozen=True, slots=True)
class ModelView:
    """One routable model: its KB state, its embedded profile and where it can run."""

    state: ModelState
    profile: np.ndarray  # (rows, dim) unit vectors: description, then examples
    servable_on: tuple[str, ...]
    loaded_on: tuple[str, ...]
    backlog: int  # entries waiting or in flight on the model's work stream


@dataclass(slots=True)
class FleetView:
    """Routable models keyed by name, plus alive workers, as of ``refreshed_ms``."""

    models: dict[str, ModelView] = field(default_factory=dict)
    workers: dict[str, WorkerState] = field(default_factory=dict)
    refreshed_ms: float = 0.0


async def load_view(kb: KnowledgeBase, names: Names, worker_timeout_s: float) -> FleetView:
    """Read models, workers and work-stream backlogs in three pipelined round trips."""
    models = await kb.models()
    workers = await kb.workers()
    now_ms = time.time() * 1000
    alive = {wid: w for wid, w in workers.items() if w.alive(now_ms, worker_timeout_s)}
    queues = await backlogs(kb, names, list(models))
    view = FleetView(workers=alive, refreshed_ms=now_ms)
    for name, state in models.items():
        if state.profile is None or state.profile_rows <= 0:
            continue
        servable = tuple(w for w, ws in alive.items() if name in ws.models_servable)
        if not servable:
            continue
        matrix = np.frombuffer(state.profile, dtype=np.float32).reshape(state.profile_rows, -1)
        loaded = tuple(w for w in state.loaded_on if w in alive)
        view.models[name] = ModelView(state, matrix, servable, loaded, queues.get(name, 0))
    return view


async def backlogs(kb: KnowledgeBase, names: Names, models: list[str]) -> dict[str, int]:
    if not models:
        return {}
    pipe = kb.client.pipeline(transaction=False)
    for model in models:
        pipe.xinfo_groups(names.work(model))
    rows: list[Any] = await pipe.execute(raise_on_error=False)
    out: dict[str, int] = {}
    for model, groups in zip(models, rows, strict=True):
        if isinstance(groups, Exception):
            continue
        for group in groups:
            if _s(group.get("name")) == names.GROUP_WORKERS:
                out[model] = int(group.get("pending") or 0) + int(group.get("lag") or 0)
    return out


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
