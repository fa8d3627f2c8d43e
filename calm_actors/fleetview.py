"""A periodically refreshed, read-only view of the KB that the analyzer and planner score against."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from broker.kb import FleetSnapshot, KnowledgeBase, ModelState, WorkerState
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

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank  # the stacked profiles' first pass (``StackedProfiles``; 0: exact)
        self._matrices: dict[str, tuple[str, np.ndarray]] = {}
        self._stacked: tuple[tuple[tuple[str, str], ...], StackedProfiles] | None = None

    async def stacked(self) -> StackedProfiles:
        """All cached profiles in one matrix (rebuilt only when the set of profiles has changed).

        A rebuild runs in a thread (its eigen-decomposition takes tens of milliseconds for the demo
        fleet), so the event loop goes on routing queries on the view it has meanwhile.
        """
        key = tuple(sorted((n, d) for n, (d, _) in self._matrices.items()))
        if self._stacked is None or self._stacked[0] != key:
            profiles = {n: m for n, (_, m) in sorted(self._matrices.items())}
            stacked = await asyncio.to_thread(StackedProfiles, profiles, self.rank)
            self._stacked = (key, stacked)
            scan = (f"first pass on {self.rank} principal axes keeping {stacked.retained:.1%} of the rows"
                    if stacked.retained is not None else "one exact pass")
            log.info("stacked %d profile rows of %d models: %s", stacked.columns.shape[1], len(profiles), scan)
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

    async def current(self, kb: KnowledgeBase, digest: str) -> DomainClassifier | None:
        """The classifier whose digest the KB holds now (`digest`, as just read; '' when there is none)."""
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


class ViewLoader:
    """Loads fleet views: the fleet's state in one round trip (two when models or workers came or went),
    profiles and the classifier again only when their digests change.

    A loader that `scores` also gives its views the classifier and the stacked profiles (a second copy of
    every profile that views which only plan do not need), scanned with ``profile_rank`` (``StackedProfiles``).
    """

    def __init__(self, kb: KnowledgeBase, worker_timeout_s: float, scores: bool = False,
                 profile_rank: int = 0) -> None:
        self.kb = kb
        self.worker_timeout_s = worker_timeout_s
        self.profiles = ProfileCache(profile_rank)
        self.classifiers = ClassifierCache() if scores else None
        self._last: FleetSnapshot | None = None

    async def load(self) -> FleetView:
        snap = self._last = await self.kb.snapshot(self._last)
        now_ms = time.time() * 1000
        alive = {wid: w for wid, w in snap.workers.items() if w.alive(now_ms, self.worker_timeout_s)}
        matrices = await self.profiles.matrices(self.kb, snap.models)
        view = FleetView(workers=alive, refreshed_ms=now_ms)
        if self.classifiers is not None:
            view.classifier = await self.classifiers.current(self.kb, snap.classifier_digest)
            view.stacked = await self.profiles.stacked()
        for name, state in snap.models.items():
            matrix = matrices.get(name)
            if matrix is None:
                continue
            servable = tuple(w for w, ws in alive.items() if name in ws.models_servable)
            if not servable:
                continue
            loaded = tuple(w for w in state.loaded_on if w in alive)
            view.models[name] = ModelView(state, matrix, servable, loaded, snap.backlogs.get(name, 0))
        return view


class LiveView:
    """A loader's latest view, refreshed often while queries use it and seldom while none come.

    `tick` (called periodically: every 0.25 s by the analyzer, 0.5 s by the planner) reloads when the
    view was used since it was loaded or is `idle_s` old; `fresh` is the view for a query, reloaded
    first when it is older than `stale_s` (the first query after a quiet spell does not route on an
    old view).
    """

    def __init__(self, loader: ViewLoader, idle_s: float = 2.0, stale_s: float = 1.0,
                 on_reload: Callable[[FleetView], Awaitable[None]] | None = None) -> None:
        self.loader = loader
        self.idle_s = idle_s
        self.stale_s = stale_s
        self.on_reload = on_reload
        self.view = FleetView()
        self._used = False

    async def reload(self) -> FleetView:
        self.view = await self.loader.load()
        self._used = False
        if self.on_reload is not None:
            await self.on_reload(self.view)
        return self.view

    async def tick(self) -> bool:
        """Reload if the view was used since its load or has grown old; True when it did."""
        if self._used or self._age_s() >= self.idle_s:
            await self.reload()
            return True
        return False

    async def fresh(self) -> FleetView:
        """The view for routing one query (reloaded first if it is older than `stale_s`)."""
        if self._age_s() >= self.stale_s:
            await self.reload()
        self._used = True
        return self.view

    def _age_s(self) -> float:
        return time.time() - self.view.refreshed_ms / 1000

