"""Scheduler: keeps the models that queries need loaded within each worker's memory budget."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from broker.codec import decode, encode
from broker.consumer import ensure_group
from broker.effects import Effects, Entry
from broker.kb import ModelState, WorkerState
from broker.messages import Control, WantModel, WorkerEvent
from broker.runtime import ProcessRuntime
from calm_actors.fleetview import backlogs
from calm_actors.residency import Action, Slot, make_policy

log = logging.getLogger(__name__)
LOAD_TIMEOUT_S = 120.0


@dataclass(slots=True)
class Pending:
    worker: str
    action: str
    deadline_ms: float


class Scheduler:
    """Consumes ``calm:sched`` (wants) and worker events; sends load/evict commands to workers."""

    def __init__(self, rt: ProcessRuntime) -> None:
        self.rt = rt
        self.names = rt.names
        self.settings = rt.settings
        self.policy = make_policy(rt.settings.scheduler.policy)
        self.models: dict[str, ModelState] = {}
        self.workers: dict[str, WorkerState] = {}
        self.pending: dict[str, Pending] = {}  # model -> pending load/evict

    def install(self) -> None:
        self.rt.consumer(self.names.sched, self.names.GROUP_SCHEDULER, handler=self.on_message)
        self.rt.every(self.settings.scheduler.interval_ms / 1000, self.tick, "tick")

    async def refresh(self) -> None:
        self.models = await self.rt.kb.models()
        self.workers = await self.rt.kb.workers()

    # -- messages ------------------------------------------------------------------
    async def on_message(self, entry: Entry) -> Effects:
        message = decode(entry.fields, entry.id, entry.stream)
        effects = Effects()
        if isinstance(message, WantModel):
            await self.refresh()
            self._act(self._place(message.model, reason="wanted by a query"), effects)
        elif isinstance(message, WorkerEvent):
            pending = self.pending.get(message.model)
            if pending is not None and pending.worker == message.worker:
                del self.pending[message.model]
            if message.event in ("registered", "stopping", "load_failed"):
                await self.refresh()
                self._act(self._warm_start(), effects)
            log.info("worker %s: %s %s %s", message.worker, message.event, message.model, message.detail)
        return effects

    # -- periodic ------------------------------------------------------------------
    async def tick(self) -> None:
        """Drop dead workers, expire stuck commands, and load models that have work but no worker."""
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
        self.pending = {m: p for m, p in self.pending.items() if p.deadline_ms > now_ms and p.worker in self.workers}
        effects = Effects()
        queues = await backlogs(self.rt.kb, self.names, list(self.models))
        for model, backlog in queues.items():
            if backlog > 0 and not self._resident(model):
                self._act(self._place(model, reason=f"{backlog} queries waiting"), effects)
        if not effects.ops:
            self._act(self._warm_start(), effects)
        if effects.ops:
            pipe = self.rt.client.pipeline(transaction=False)
            for op in effects.ops:
                op(pipe)
            await pipe.execute()

    # -- planning ------------------------------------------------------------------
    def _slots(self) -> list[Slot]:
        now_ms = time.time() * 1000
        slots = []
        for w in self.workers.values():
            if not w.alive(now_ms, self.settings.scheduler.worker_timeout_s):
                continue
            loaded = {m: w.last_used.get(m, 0.0) for m in w.models_loaded}
            for model, p in self.pending.items():  # count commands in flight as done
                if p.worker == w.id:
                    if p.action == "load":
                        loaded[model] = now_ms
                    else:
                        loaded.pop(model, None)
            slots.append(Slot(w.id, w.memory_budget_mb, frozenset(w.models_servable), loaded))
        return slots

    def _memory(self) -> dict[str, float]:
        return {name: max(m.memory_mb, 1.0) for name, m in self.models.items()}

    def _resident(self, model: str) -> bool:
        return any(model in s.loaded for s in self._slots())

    def _place(self, model: str, reason: str) -> list[Action]:
        if model in self.pending:
            return []
        actions = self.policy.place(model, self._slots(), self._memory(), time.time() * 1000)
        if not actions and not self._resident(model):
            log.warning("cannot place %s (%s): no worker can hold it now", model, reason)
        return actions

    def _warm_start(self) -> list[Action]:
        order = sorted(self.models.values(), key=lambda m: (m.baseline, -m.requests, m.name))
        return self.policy.fill([m.name for m in order], self._slots(), self._memory())

    def _act(self, actions: list[Action], effects: Effects) -> None:
        now_ms = time.time() * 1000
        for action in actions:
            control = Control(action=action.kind, model=action.model, reason=action.reason, at_ms=now_ms)
            effects.xadd(self.names.control(action.worker), encode(control), maxlen=10_000)
            self.pending[action.model] = Pending(action.worker, action.kind, now_ms + LOAD_TIMEOUT_S * 1000)
            log.info("%s %s on %s: %s", action.kind, action.model, action.worker, action.reason)


async def start(rt: ProcessRuntime) -> Scheduler:
    scheduler = Scheduler(rt)
    await ensure_group(rt.client, rt.names.sched, rt.names.GROUP_SCHEDULER)
    await scheduler.refresh()
    scheduler.install()
    return scheduler
