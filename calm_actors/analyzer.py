"""Analyzer: scores every routable model for each query (semantic fit + predicted QoS from the KB)."""

from __future__ import annotations

import logging
import time

import numpy as np

from broker.codec import decode_as, encode
from broker.effects import Effects, Entry
from broker.messages import Embedded, Scored
from broker.replies import ReplyBook
from broker.runtime import ProcessRuntime
from calm_actors.cache import exact_hit
from calm_actors.fleetview import LiveView, ViewLoader
from calm_actors.replying import answer_dead_query
from calm_actors.scoring import domain_of, score_all
from calm_actors.tuning import Tuning

log = logging.getLogger(__name__)


class NotReady(RuntimeError):
    """Nothing can be routed yet; the entry stays pending and is retried after the reclaim delay."""
VIEW_REFRESH_S = 0.25  # while queries come; see LiveView for quiet spells


class Analyzer:
    """Consumes ``calm:analyze``, produces ``calm:plan``."""

    def __init__(self, rt: ProcessRuntime) -> None:
        self.rt = rt
        self.names = rt.names
        self.settings = rt.settings
        self.live = LiveView(ViewLoader(rt.kb, rt.settings.scheduler.worker_timeout_s, scores=True,
                                        profile_rank=rt.settings.planner.profile_rank))
        self.replies = ReplyBook(rt.names, rt.settings.ingress.dedup_window_s,
                                 rt.settings.streams.replies_maxlen)
        self.tuning = Tuning(rt, ("planner",))

    def install(self) -> None:
        self.rt.consumer(self.names.analyze, self.names.GROUP_ANALYZER, handler=self.on_embedded, trim_acked=True,
                         on_dead=answer_dead_query(self.replies))
        self.rt.every(VIEW_REFRESH_S, self.live.tick, "view")
        self.rt.every(1.0, self.retune, "tuning")

    async def retune(self) -> None:
        """Pick up ``planner.*`` overrides set with ``calm config set``: the fit's temperatures and the
        classifier's weight apply to the next query (``planner.profile_rank`` only at start)."""
        settings = await self.tuning.poll()
        if settings is not None:
            self.settings = settings

    async def on_embedded(self, entry: Entry) -> Effects:
        message = decode_as(Embedded, entry.fields, entry.id, entry.stream)
        if message.exact_hit:
            return self._pass_exact_hit(message)
        embedding = np.frombuffer(message.embedding, dtype=np.float32)
        pinned = message.query.model
        view = await self.live.fresh()
        if not view.models or (pinned is not None and pinned not in view.models):
            view = await self.live.reload()  # a model may have registered since the last refresh
        if not view.models:
            raise NotReady("no routable model yet (no worker registered, or models not profiled)")
        candidates = score_all(message.query, embedding, view, self.settings.planner)
        domain = domain_of(candidates, view)
        if message.query.model is not None:
            candidates = [c for c in candidates if c.model == message.query.model]
        stamps = {**message.stamps, "analyzer_ms": time.time() * 1000}
        scored = Scored(query=message.query, candidates=candidates, domain=domain, stamps=stamps,
                        embedding=message.embedding, embedding_truncated=message.embedding_truncated)
        return Effects().xadd(self.names.plan, encode(scored), maxlen=self.settings.streams.maxlen)

    def _pass_exact_hit(self, message: Embedded) -> Effects:
        """A query the monitor found in the exact cache: nothing to score; its domain is the cached reply's."""
        domain = str(exact_hit(message.exact_hit).reply.get("domain", ""))
        stamps = {**message.stamps, "analyzer_ms": time.time() * 1000}
        scored = Scored(query=message.query, candidates=[], domain=domain, stamps=stamps,
                        exact_hit=message.exact_hit)
        return Effects().xadd(self.names.plan, encode(scored), maxlen=self.settings.streams.maxlen)


async def start(rt: ProcessRuntime) -> Analyzer:
    analyzer = Analyzer(rt)
    await analyzer.live.reload()
    analyzer.install()
    return analyzer


