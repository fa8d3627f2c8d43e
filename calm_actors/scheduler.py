"""Scheduler: keeps the models that queries need loaded within each worker's memory budget.

It runs the configured residency policy (``scheduler.policy``: lru, demand60, static, forecast),
the same code ``calm bench residency`` replays traces through. Demand comes from the knowledge base
(per-model and per-domain buckets the planner counts); a cold miss (``WantModel``) or work waiting
for a model nobody holds asks the policy to place it; every ``interval_ms`` the policy plans
(prefetch, rebalance) and a worker joining or leaving triggers a plan at once. A model loaded for
waiting queries is watched once its worker reports it loaded: ``react_ms`` after those queries are
served the policy plans again, so a one-off request's model gives its room back within a load
instead of an interval. Commands go to ``calm:control:<worker>``; the workers' acknowledgements
update the knowledge base.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from broker.codec import decode, encode
from broker.consumer import ensure_group
from broker.effects import Effects, Entry
from broker.kb import FleetSnapshot, ModelState, WorkerState
from broker.messages import Control, WantModel, WorkerEvent
from broker.runtime import ProcessRuntime
from calm_actors.forecast import Demand
from calm_actors.residency import Action, ModelCosts, Slot, fill, make_policy

log = logging.getLogger(__name__)
LOAD_TIMEOUT_S = 120.0
RETRY_FIRST_S = 1.0  # a failed load is not retried on that worker for this long, doubling up to the cap
RETRY_CAP_S = 60.0
VISIT_WATCH_S = 30.0  # a model loaded for waiting queries is watched this long at most for them to be served


@dataclass(slots=True)
class Pending:
    action: str
    deadline_ms: float


@dataclass(slots=True)
class Visit:
    """A model loaded for queries that were waiting for it: plan again once they are served."""

    until: float  # time.monotonic() after which it is no longer watched
    loaded: bool = False  # its worker reported it loaded: its backlog now tells whether they were served


@dataclass(slots=True)
class LoadFailure:
    count: int
    retry_ms: float  # until then the worker is not asked to load the model again


class Scheduler:
    """Consumes ``calm:sched`` (wants) and worker events; sends load/evict commands to workers."""

    def __init__(self, rt: ProcessRuntime) -> None:
        self.rt = rt
        self.names = rt.names
        self.settings = rt.settings
        s = rt.settings.scheduler
        self.demand = Demand(s.bucket_s)
        self.costs = ModelCosts()
        self.policy = make_policy(s.policy, s, self.demand, self.costs)
        self.models: dict[str, ModelState] = {}
        self.workers: dict[str, WorkerState] = {}
        self.pending: dict[tuple[str, str], Pending] = {}  # (worker, model) -> command in flight
        self.failed: dict[tuple[str, str], LoadFailure] = {}  # (worker, model) -> its loads that failed
        self.backlog: dict[str, int] = {}
        self._snapshot: FleetSnapshot | None = None
        self.card_mb: dict[str, float] = {}  # each model's size as first seen (as registered: the card's estimate)
        self.visits: dict[str, Visit] = {}  # models loaded for waiting queries, until those are served
        self._visit_loaded = asyncio.Event()  # set while a watched model is loaded: poll its backlog

    def install(self) -> None:
        self.rt.consumer(self.names.sched, self.names.GROUP_SCHEDULER, handler=self.on_message)
        self.rt.every(self.settings.scheduler.interval_ms / 1000, self.tick, "tick")
        self.rt.spawn(self._react_loop(), "react")

    async def refresh(self) -> None:
        """Models, workers and their work streams' backlogs (what must not go now), in one round trip."""
        self._snapshot = await self.rt.kb.snapshot(self._snapshot)
        self.models, self.workers = self._snapshot.models, self._snapshot.workers
        self.backlog = self._snapshot.backlogs
        for name, m in self.models.items():
            self.card_mb.setdefault(name, m.memory_mb)

    async def refresh_demand(self) -> None:
        """Copy demand from the KB (a specialist's demand includes its domain's) and what models cost."""
        domains = sorted({m.domain for m in self.models.values() if not m.baseline})
        own, by_domain = await self.rt.kb.demand_and_domains(list(self.models), domains)
        for model, buckets in merge_domain_demand(self.models.values(), own, by_domain).items():
            self.demand.set(model, buckets)
        for name, m in self.models.items():
            if m.load_s:
                self.costs.load_s[name] = m.load_s
            if m.latency_ms:
                self.costs.capacity_rps[name] = 1000.0 / m.latency_ms

    # -- messages ------------------------------------------------------------------
    async def on_message(self, entry: Entry) -> Effects:
        message = decode(entry.fields, entry.id, entry.stream)
        effects = Effects()
        if isinstance(message, WantModel):
            await self.refresh()
            await self.refresh_demand()
            self._act(self._place(message.model, reason="wanted by a query"), effects)
        elif isinstance(message, WorkerEvent):
            self.pending.pop((message.worker, message.model), None)
            self._note_outcome(message)
            if message.model in self.visits and message.event in ("loaded", "load_failed"):
                if message.event == "loaded":
                    self.visits[message.model].loaded = True
                    self._visit_loaded.set()
                else:
                    del self.visits[message.model]
            if message.event in ("registered", "stopping", "load_failed"):
                await self.refresh()
                await self.refresh_demand()
                self._act(self._replan(), effects)
            log.info("worker %s: %s %s %s", message.worker, message.event, message.model, message.detail)
        return effects

    def _note_outcome(self, event: WorkerEvent) -> None:
        """Back off a model that failed to load on a worker (a corrupt file fails again at once)."""
        key = (event.worker, event.model)
        if event.event == "load_failed":
            count = self.failed[key].count + 1 if key in self.failed else 1
            delay_s = min(RETRY_CAP_S, RETRY_FIRST_S * 2 ** (count - 1))
            self.failed[key] = LoadFailure(count, time.time() * 1000 + delay_s * 1000)
            log.warning("worker %s failed to load %s (%d in a row); not asking again for %.0fs",
                        event.worker, event.model, count, delay_s)
        elif event.event == "loaded":
            self.failed.pop(key, None)
        elif event.event == "registered":  # a worker (re)started: its files may have been fixed
            self.failed = {k: f for k, f in self.failed.items() if k[0] != event.worker}

    # -- periodic ------------------------------------------------------------------
    async def tick(self) -> None:
        """Drop dead workers, expire stuck commands, place models with waiting work, and plan."""
        await self.refresh()
        now_ms = time.time() * 1000
        timeout_s = self.settings.scheduler.worker_timeout_s
        dead = [w for w in self.workers.values() if not w.alive(now_ms, timeout_s)]
        if dead:
            pipe = self.rt.client.pipeline(transaction=True)
            for worker in dead:
                log.warning("worker %s missed heartbeats for %.0fs: removing it", worker.id, timeout_s)
                self.rt.kb.remove_worker(pipe, worker.id, worker.models_loaded)
            await pipe.execute()
            await self.refresh()
        self.pending = {k: p for k, p in self.pending.items() if p.deadline_ms > now_ms and k[0] in self.workers}
        await self.refresh_demand()
        effects = Effects()
        for model, waiting in self.backlog.items():
            if waiting > 0 and not self._resident(model):
                self._act(self._place(model, reason=f"{waiting} queries waiting"), effects)
        if not effects.ops:
            self._act(self._replan(), effects)
        await self._send(effects)

    async def _react_loop(self) -> None:
        """Every ``react_ms`` while a watched model is loaded: plan once its waiting queries are served."""
        pause_s = self.settings.scheduler.react_ms / 1000
        while True:
            await self._visit_loaded.wait()
            await asyncio.sleep(pause_s)
            try:
                await self.react()
            except Exception:
                log.exception("scheduler: re-planning after a visit failed")

    async def react(self) -> None:
        """Plan at once for each watched model that has served its waiting queries (no backlog left)."""
        now = time.monotonic()
        self.visits = {m: v for m, v in self.visits.items() if v.until > now}
        if not any(v.loaded for v in self.visits.values()):
            self._visit_loaded.clear()
            return
        await self.refresh()
        served = [m for m, v in self.visits.items() if v.loaded and self.backlog.get(m, 0) == 0]
        if not served:
            return
        for model in served:
            del self.visits[model]
        await self.refresh_demand()
        effects = Effects()
        self._act(self._replan(), effects)
        await self._send(effects)

    async def _send(self, effects: Effects) -> None:
        """Send the commands ``_act`` gathered, in one round trip."""
        if effects.ops:
            pipe = self.rt.client.pipeline(transaction=False)
            for op in effects.ops:
                op(pipe)
            await pipe.execute()

    # -- planning ------------------------------------------------------------------
    def _slots(self) -> list[Slot]:
        """Alive workers as the policy sees them, with commands in flight counted as done."""
        now_ms = time.time() * 1000
        slots = []
        for w in self.workers.values():
            if not w.alive(now_ms, self.settings.scheduler.worker_timeout_s):
                continue
            loaded = {m: w.last_used.get(m, 0.0) / 1000 for m in w.models_loaded}
            for (worker, model), p in self.pending.items():
                if worker == w.id:
                    if p.action == "load":
                        loaded[model] = now_ms / 1000
                    else:
                        loaded.pop(model, None)
            servable = frozenset(m for m in w.models_servable
                                 if (f := self.failed.get((w.id, m))) is None or f.retry_ms <= now_ms)
            slots.append(Slot(w.id, w.memory_budget_mb, servable, loaded))
        return slots

    def _memory(self) -> dict[str, float]:
        """Memory per model for budgeting: the card's estimate or the latest measured use, whichever is larger.

        A measurement can undercount (an allocator that keeps freed memory makes a reload look free),
        so never less than the card; and it can overcount (the worker measures its process's growth,
        which a concurrent inference inflates), so the latest, not the largest ever: one inflated
        measurement would otherwise shrink a worker's room for good. This is the worker's own
        admission check (card or its last measurement, whichever is larger), which guards the budget.
        """
        return {name: max(self.card_mb.get(name, 0.0), m.memory_mb, 1.0) for name, m in self.models.items()}

    def _pinned(self) -> set[str]:
        """Models with queries waiting or a command in flight: never evicted now."""
        return {m for m, n in self.backlog.items() if n > 0} | {m for _, m in self.pending}

    def _resident(self, model: str) -> bool:
        return any(model in s.loaded for s in self._slots())

    def _place(self, model: str, reason: str) -> list[Action]:
        if any(m == model for _, m in self.pending):
            return []
        actions = self.policy.place(model, self._slots(), self._memory(), time.time(), self._pinned())
        if any(a.kind == "load" and a.model == model for a in actions):
            self.visits[model] = Visit(time.monotonic() + VISIT_WATCH_S)
        if not actions and not self._resident(model):
            if model in getattr(self.policy, "waiting", {}):
                log.debug("%s (%s) waits for a busy model loaded on demand to make room", model, reason)
                return actions
            now_ms = time.time() * 1000
            backing_off = any(m == model and f.retry_ms > now_ms for (_, m), f in self.failed.items())
            log.log(logging.DEBUG if backing_off else logging.WARNING,
                    "cannot place %s (%s): no worker can hold it now", model, reason)
        return actions

    def _replan(self) -> list[Action]:
        """The policy's plan; when it asks for nothing, fill free memory (warm start) without evicting."""
        slots, memory = self._slots(), self._memory()
        actions = self.policy.plan(slots, memory, time.time(), self._pinned())
        if actions:
            return actions
        order = sorted(self.models.values(), key=lambda m: (m.baseline, -self.demand.total(m.name), -m.requests,
                                                             m.name))
        actions = fill([m.name for m in order], slots, memory)
        note = getattr(self.policy, "note", None)  # a policy that keeps loads a while learns of these too
        if note is not None:
            note(actions, time.time())
        return actions

    def _act(self, actions: list[Action], effects: Effects) -> None:
        now_ms = time.time() * 1000
        for action in actions:
            control = Control(action=action.kind, model=action.model, reason=action.reason, at_ms=now_ms)
            effects.xadd(self.names.control(action.worker), encode(control), maxlen=10_000)
            self.pending[(action.worker, action.model)] = Pending(action.kind, now_ms + LOAD_TIMEOUT_S * 1000)
            log.info("%s %s on %s: %s", action.kind, action.model, action.worker, action.reason)


def merge_domain_demand(models: Iterable[ModelState], own: Mapping[str, Mapping[int, int]],
                        by_domain: Mapping[str, Mapping[int, int]]) -> dict[str, dict[int, int]]:
    """Each model's demand per bucket; a domain's sole specialist also counts its domain's queries.

    The planner may serve a query elsewhere while its specialist is cold; the domain's count says
    what the specialist would have had (per bucket, the larger of the two).
    """
    models = list(models)
    specialists: dict[str, list[str]] = {}
    for m in models:
        if not m.baseline:
            specialists.setdefault(m.domain, []).append(m.name)
    out = {m.name: dict(own.get(m.name, {})) for m in models}
    for domain, names in specialists.items():
        if len(names) != 1:
            continue
        merged = out[names[0]]
        for bucket, n in by_domain.get(domain, {}).items():
            merged[bucket] = max(merged.get(bucket, 0), n)
    return out


async def start(rt: ProcessRuntime) -> Scheduler:
    scheduler = Scheduler(rt)
    await ensure_group(rt.client, rt.names.sched, rt.names.GROUP_SCHEDULER)
    await scheduler.refresh()
    scheduler.install()
    return scheduler
