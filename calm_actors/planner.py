"""Planner: picks the model for each query, explains the decision, and asks for cold models."""

from __future__ import annotations

import json
import logging
import time

from broker.codec import decode_as, encode
from broker.effects import Effects, Entry
from broker.messages import Candidate, Decision, Planned, Query, Scored, WantModel
from broker.replies import ReplyBook
from broker.runtime import ProcessRuntime
from calm_actors.cache import exact_hit
from calm_actors.fleetview import FleetView, LiveView, ViewLoader
from calm_actors.planning import Routable, heldout_on, make_strategy, utility
from calm_actors.replying import answer_dead_query, query_rejection
from calm_actors.tuning import Tuning

log = logging.getLogger(__name__)
VIEW_REFRESH_S = 0.5  # while queries come; see LiveView for quiet spells


class Planner:
    """Consumes ``calm:plan``; produces ``calm:execute``, ``calm:decisions`` and ``calm:sched`` wants."""

    def __init__(self, rt: ProcessRuntime) -> None:
        self.rt = rt
        self.names = rt.names
        self.settings = rt.settings
        self.strategy = make_strategy(rt.settings.planner)
        self.tuning = Tuning(rt, ("planner",))
        self._sent: dict[str, int] = {}  # dispatched per model since the view was read (for backpressure)
        self.live = LiveView(ViewLoader(rt.kb, rt.settings.scheduler.worker_timeout_s), on_reload=self._on_reload)
        self.replies = ReplyBook(rt.names, rt.settings.ingress.dedup_window_s,
                                 rt.settings.streams.replies_maxlen)

    async def _on_reload(self, view: FleetView) -> None:
        """A new view counts its own backlogs; runtime config is read with it."""
        self._sent = {}
        await self._reload_weights()

    async def _reload_weights(self) -> None:
        """Apply ``planner.*`` overrides from the KB's runtime config (operators retune without restarts)."""
        settings = await self.tuning.poll()
        if settings is None:
            return
        try:
            strategy = make_strategy(settings.planner)
        except ValueError as e:
            log.error("ignoring runtime planner config: %s", e)
            return
        self.settings = settings
        if strategy.name != self.strategy.name:
            self.strategy = strategy
        self.strategy.weights = settings.planner

    def install(self) -> None:
        self.rt.consumer(self.names.plan, self.names.GROUP_PLANNER, handler=self.on_scored, trim_acked=True,
                         on_dead=answer_dead_query(self.replies))
        self.rt.every(VIEW_REFRESH_S, self.live.tick, "view")

    async def on_scored(self, entry: Entry) -> Effects:
        message = decode_as(Scored, entry.fields, entry.id, entry.stream)
        if message.exact_hit:
            return self._pass_exact_hit(message)
        query = message.query
        view = await self.live.fresh()
        options = [self._routable(c, view, message.domain) for c in message.candidates]
        effects = Effects()
        limit = self.settings.planner.max_queue_per_model
        open_options = [o for o in options if o.candidate.queue + self._sent.get(o.candidate.model, 0) < limit]
        if options and not open_options:
            return self._shed(query, effects)
        decision = self.strategy.choose(query, open_options)
        if decision is None:
            reason = "no worker can serve any model right now"
            effects.dead_letter(self.names, entry, reason, "planner", self.settings.streams.dead_maxlen)
            reply = query_rejection(query, reason, status="error")
            return effects.call(lambda p: self.replies.deliver(p, query.id, query.reply_to, reply))
        self._sent[decision.model] = self._sent.get(decision.model, 0) + 1
        now = time.time()
        stamps = {**message.stamps, "planner_ms": now * 1000}
        planned = Planned(query=query, decision=decision, domain=message.domain, stamps=stamps,
                          embedding=message.embedding, embedding_truncated=message.embedding_truncated)
        effects.xadd(self.names.execute, encode(planned), maxlen=self.settings.streams.maxlen)
        explanation = self._explain(planned, message)
        effects.xadd(self.names.decisions, explanation, maxlen=self.settings.streams.decisions_maxlen)
        # A pinned query is demand for its model only; an automatic one also counts for its topic, so a cold
        # specialist is credited with what the planner had to send elsewhere.
        topic = planned.domain if query.model is None else ""
        effects.call(lambda p: self.rt.kb.record_demand(p, decision.model, now, self.settings.scheduler.bucket_s,
                                                        domain=topic))
        chosen = view.models.get(decision.model)
        wants = [decision.wanted] if decision.wanted else []
        if chosen is None or not chosen.loaded_on:
            wants.append(decision.model)
        for model in wants:
            want = WantModel(model=model, query_id=query.id, at_ms=now * 1000)
            effects.xadd(self.names.sched, encode(want), maxlen=self.settings.streams.maxlen)
        return effects

    @staticmethod
    def _routable(candidate: Candidate, view: FleetView, domain: str) -> Routable:
        model = view.models.get(candidate.model)
        if model is None:
            return Routable(candidate, baseline=False)
        domains = model.state.domains
        return Routable(candidate, model.state.baseline, heldout_on(model.state.quality, domain),
                        claims_domain=not domains or not domain or domain in domains)

    def _pass_exact_hit(self, message: Scored) -> Effects:
        """A query answered from the exact cache: no model runs, so no demand and no wants; the decision says so."""
        query = message.query
        model = str(exact_hit(message.exact_hit).reply.get("model", ""))
        decision = Decision(model=model, reason="exact cache hit")
        stamps = {**message.stamps, "planner_ms": time.time() * 1000}
        planned = Planned(query=query, decision=decision, domain=message.domain, stamps=stamps,
                          exact_hit=message.exact_hit)
        effects = Effects().xadd(self.names.execute, encode(planned), maxlen=self.settings.streams.maxlen)
        return effects.xadd(self.names.decisions, self._explain(planned, message),
                            maxlen=self.settings.streams.decisions_maxlen)

    def _shed(self, query: Query, effects: Effects) -> Effects:
        """Backpressure: every model that could serve the query is full; say so instead of queueing."""
        limit = self.settings.planner.max_queue_per_model
        reply = query_rejection(query, f"overloaded: every eligible model has {limit}+ queries waiting")
        log.warning("shed query %s: overloaded", query.id, extra={"query_id": query.id})
        effects.call(lambda p: self.replies.send_unclaimed(p, query.reply_to, reply))
        effects.call(lambda p: p.delete(self.names.claim(query.id)))  # a retry with the same id may run later
        return effects.call(lambda p: p.hincrby(self.names.counters, "shed_overloaded", 1))

    def _explain(self, planned: Planned, scored: Scored) -> dict[str, str]:
        decision: Decision = planned.decision
        rows = [
            {"model": c.model, "fit": round(c.fit, 4), "cosine": round(c.cosine, 4),
             "latency_ms": round(c.latency_ms, 2), "energy_j": round(c.energy_j, 4), "quality": round(c.quality, 4),
             "error_rate": round(c.error_rate, 4), "loaded": c.loaded, "queue": c.queue,
             "utility": round(utility(c, self.settings.planner), 4)}
            for c in scored.candidates
        ]
        return {
            "id": planned.query.id, "model": decision.model, "reason": decision.reason,
            "utility": f"{decision.utility:.4f}", "slo_met": "1" if decision.slo_met else "0",
            "domain": planned.domain, "strategy": self.strategy.name, "candidates": json.dumps(rows),
        }


async def start(rt: ProcessRuntime) -> Planner:
    planner = Planner(rt)
    await planner.live.reload()
    planner.install()
    return planner
