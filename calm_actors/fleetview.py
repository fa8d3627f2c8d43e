"""A periodically refreshed, read-only view of the KB that the analyzer and planner score against."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker.kb import KnowledgeBase, ModelState, WorkerState
from broker.names import Names
from calm_actors.domain_classifier import ClassifierError, DomainClassifier
from calm_actors.similarity import StackedProfiles

log = logging.getLogger(__name__)


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
    classifier: DomainClassifier | None = None  # loaded only by views that score (the analyzer's)
    stacked: StackedProfiles | None = None  # every profile in one matrix (scoring views only)


class ProfileCache:
    """Routing profiles by model, re-read from the KB only when a model's profile digest changes."""

    def __init__(self) -> None:
        self._matrices: dict[str, tuple[str, np.ndarray]] = {}
        self._stacked: tuple[tuple[tuple[str, str], ...], StackedProfiles] | None = None

    def stacked(self) -> StackedProfiles:
        """All cached profiles in one matrix (rebuilt only when the set of profiles has changed)."""
        key = tuple(sorted((n, d) for n, (d, _) in self._matrices.items()))
        if self._stacked is None or self._stacked[0] != key:
            self._stacked = (key, StackedProfiles({n: m for n, (_, m) in sorted(self._matrices.items())}))
        return self._stacked[1]

    async def matrices(self, kb: KnowledgeBase, states: dict[str, ModelState]) -> dict[str, np.ndarray]:
        wanted = {n: s for n, s in states.items() if s.profile_rows > 0 and s.profile_digest}
        stale = [n for n, s in wanted.items() if self._matrices.get(n, ("", None))[0] != s.profile_digest]
        for name, raw in (await kb.profiles(stale)).items():
            rows = wanted[name].profile_rows
            if len(raw) % (4 * rows) == 0:
                self._matrices[name] = (wanted[name].profile_digest,
                                        np.frombuffer(raw, dtype=np.float32).reshape(rows, -1))
        for name in set(self._matrices) - set(wanted):
            del self._matrices[name]
        return {n: m for n, (digest, m) in self._matrices.items()
                if n in wanted and digest == wanted[n].profile_digest}


class ClassifierCache:
    """The fleet's domain classifier, re-read and decoded only when its digest changes."""

    def __init__(self) -> None:
        self._current: DomainClassifier | None = None
        self._bad_digest = ""

    async def current(self, kb: KnowledgeBase) -> DomainClassifier | None:
        digest = await kb.classifier_digest()
        if not digest:
            self._current = None
        elif (self._current is None or self._current.digest != digest) and digest != self._bad_digest:
            stored = await kb.classifier()
            if stored is not None:
                try:
                    self._current = DomainClassifier.from_bytes(stored[1])
                except ClassifierError as e:
                    log.warning("ignoring the stored domain classifier %s: %s", stored[0], e)
                    self._bad_digest, self._current = stored[0], None
        return self._current


async def load_view(kb: KnowledgeBase, names: Names, worker_timeout_s: float,
                    profiles: ProfileCache | None = None, classifiers: ClassifierCache | None = None) -> FleetView:
    """Read models, workers and work-stream backlogs in a few pipelined round trips.

    Pass the same ``profiles`` cache on every call so that unchanged profiles are not read again, and a
    ``classifiers`` cache when the view will score queries: only such a view also gets the classifier
    and the stacked profiles (a second copy of every profile that views which only plan do not need).
    """
    models = await kb.models()
    workers = await kb.workers()
    now_ms = time.time() * 1000
    alive = {wid: w for wid, w in workers.items() if w.alive(now_ms, worker_timeout_s)}
    queues = await backlogs(kb, names, list(models))
    profiles = profiles or ProfileCache()
    matrices = await profiles.matrices(kb, models)
    view = FleetView(workers=alive, refreshed_ms=now_ms)
    if classifiers is not None:
        view.classifier, view.stacked = await classifiers.current(kb), profiles.stacked()
    for name, state in models.items():
        matrix = matrices.get(name)
        if matrix is None:
            continue
        servable = tuple(w for w, ws in alive.items() if name in ws.models_servable)
        if not servable:
            continue
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
