"""Executor: dispatches planned queries to model work streams, retries timeouts, and writes replies."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import msgspec

from broker.codec import decode_as, encode
from broker.consumer import ensure_group
from broker.effects import Effects, Entry, dead_letter_fields
from broker.errors import DecodeError
from broker.messages import Inflight, Planned, Result, Work
from broker.replies import ReplyBook, generation_reply
from broker.runtime import ProcessRuntime
from calm_actors.cache import MIRROR_REFRESH_S, Hit, ResponseCache, exact_hit
from calm_actors.learning import Learner
from calm_actors.replying import answer_dead_query, query_rejection, stage_times
from calm_actors.tuning import Tuning

log = logging.getLogger(__name__)
LOCAL_INFLIGHT_MAX = 100_000  # attempts this executor remembers having dispatched (a copy of what Redis holds)


class Executor:
    """Consumes ``calm:execute`` and ``calm:results``; sweeps timed-out work."""

    def __init__(self, rt: ProcessRuntime) -> None:
        self.rt = rt
        self.names = rt.names
        self.settings = rt.settings
        self.replies = ReplyBook(rt.names, rt.settings.ingress.dedup_window_s,
                                 rt.settings.streams.replies_maxlen)
        self._groups: set[str] = set()
        self.cache = ResponseCache(rt.client, rt.names, rt.settings.cache)
        self.learner = Learner(rt.client, rt.names)
        self.tuning = Tuning(rt, ("cache", "executor"))
        self._answer_dead = answer_dead_query(self.replies)
        # The in-flight records this executor wrote, so a successful result needs no read of calm:inflight:data.
        # Redis stays the record every executor finishes from; this copy only saves the round trip.
        self._dispatched: OrderedDict[str, Inflight] = OrderedDict()

    def install(self) -> None:
        self.rt.consumer(self.names.execute, self.names.GROUP_EXECUTOR, batch_handler=self.on_planned_batch,
                         on_dead=self._answer_dead, trim_acked=True)
        self.rt.consumer(self.names.results, self.names.GROUP_RESULTS, batch_handler=self.on_results, batch=128,
                         trim_acked=True)
        self.rt.every(self.settings.executor.sweep_interval_ms / 1000, self.sweep, "sweep")
        self.rt.every(self.settings.qos.learn_flush_s, self.learner.flush, "learn")
        self.rt.every(MIRROR_REFRESH_S, self.cache.refresh, "cache mirrors")
        self.rt.every(1.0, self.retune, "tuning")

    async def retune(self) -> None:
        """Pick up ``cache.*`` and ``executor.*`` overrides set with ``calm config set``."""
        settings = await self.tuning.poll()
        if settings is not None:
            self.settings = settings
            self.cache.settings = settings.cache

    # -- dispatch ------------------------------------------------------------------
    async def on_planned_batch(self, entries: list[Entry]) -> Sequence[Effects]:
        """Answer from the cache what it can and dispatch the rest."""
        out = [Effects() for _ in entries]
        planned: list[tuple[int, Planned]] = []
        for i, entry in enumerate(entries):
            try:
                planned.append((i, decode_as(Planned, entry.fields, entry.id, entry.stream)))
            except DecodeError as e:
                out[i].dead_letter(self.names, entry, str(e), "executor", self.settings.streams.dead_maxlen)
        # The monitor found the exact hits (the decision says so); the semantic cache needs the domain, so it
        # is searched here, in this process's mirror: no round trip in the query's path. An embedding of the
        # prompt's opening only is not searched with (nor stored): prompts that differ later would look alike.
        now_ms = time.time() * 1000
        for i, p in planned:
            try:
                hit = exact_hit(p.exact_hit) if p.exact_hit else self.cache.recall(p.query, _whole(p), p.domain)
            except DecodeError as e:  # the monitor checked it, so only a tampered message gets here
                out[i].dead_letter(self.names, entries[i], str(e), "executor", self.settings.streams.dead_maxlen)
                self._answer_dead(entries[i], str(e), out[i])
                continue
            inflight = Inflight(query=p.query, decision=p.decision, domain=p.domain, attempt=1, dispatched_ms=now_ms,
                                stamps={**p.stamps, "executor_ms": now_ms}, embedding=p.embedding,
                                embedding_truncated=p.embedding_truncated)
            if hit is not None:
                out[i] = self._cached_reply(inflight, hit)
            else:
                await self._dispatch(inflight, out[i])
        return out

    def _cached_reply(self, inflight: Inflight, hit: Hit) -> Effects:
        query = inflight.query
        now_ms = time.time() * 1000
        reply = {
            **hit.reply, "id": query.id, "status": "ok", "worker": "", "cached": True, "cache": hit.kind,
            "cache_similarity": round(hit.similarity, 4), "latency_ms": now_ms - query.arrived_ms,
            "route_ms": max(0.0, now_ms - query.arrived_ms), "queue_ms": 0.0, "inference_ms": 0.0, "energy_j": 0.0,
            "error": "", "domain": inflight.domain, "slo_met": True, "reason": f"{hit.kind} cache hit",
            "attempts": 0, **stage_times(inflight),
        }
        effects = Effects().call(lambda p: self.replies.deliver(p, query.id, query.reply_to, reply))
        return effects.call(lambda p: p.hincrby(self.names.counters, f"cache_hits_{hit.kind}", 1))

    @staticmethod
    def model_for(inflight: Inflight) -> str:
        """Attempt 1 runs the decision; later attempts walk its fallbacks (then repeat the last choice)."""
        order = [inflight.decision.model, *inflight.decision.fallbacks]
        return order[min(inflight.attempt - 1, len(order) - 1)]

    async def _dispatch(self, inflight: Inflight, effects: Effects) -> Effects:
        query, model = inflight.query, self.model_for(inflight)
        stream = self.names.work(model)
        if stream not in self._groups:  # entries added before any worker joins must still be delivered
            await ensure_group(self.rt.client, stream, self.names.GROUP_WORKERS)
            self._groups.add(stream)
        direct = self.settings.executor.worker_replies
        work = Work(id=query.id, attempt=inflight.attempt, model=model, prompt=query.prompt,
                    max_new_tokens=query.max_new_tokens, temperature=query.temperature,
                    dispatched_ms=inflight.dispatched_ms, reply_to=query.reply_to if direct else "",
                    reply=msgspec.msgpack.encode(_reply_template(inflight)) if direct else b"",
                    arrived_ms=query.arrived_ms, reply_copy=self.cache.exact_copy(query) if direct else None)
        deadline_ms = time.time() * 1000 + self.settings.executor.attempt_timeout_s * 1000
        effects.xadd(stream, encode(work), maxlen=self.settings.streams.maxlen)
        effects.call(lambda p: p.hset(self.names.inflight_data, query.id, encode(inflight)[b"m"]))
        effects.call(lambda p: p.zadd(self.names.inflight, {query.id: deadline_ms}))
        self._dispatched[query.id] = inflight
        self._dispatched.move_to_end(query.id)
        if len(self._dispatched) > LOCAL_INFLIGHT_MAX:
            self._dispatched.popitem(last=False)
        return effects

    # -- results -------------------------------------------------------------------
    async def on_results(self, entries: list[Entry]) -> Sequence[Effects]:
        out: list[Effects] = [Effects() for _ in entries]
        results: list[tuple[int, Result]] = []
        for i, entry in enumerate(entries):
            try:
                results.append((i, decode_as(Result, entry.fields, entry.id, entry.stream)))
            except DecodeError as e:
                out[i].dead_letter(self.names, entry, str(e), "executor", self.settings.streams.dead_maxlen)
        if not results:
            return out
        # A success this executor dispatched is answered from its own copy (the reply's delivery is idempotent
        # per query id, so a copy that another executor has already answered sends nothing twice); the rest,
        # and every failure (whose retry must see the latest attempt), read the shared record.
        known = {r.id: self._dispatched[r.id] for _, r in results if r.ok and r.id in self._dispatched}
        unknown = list(dict.fromkeys(r.id for _, r in results if r.id not in known))
        raw: list[Any] = await self.rt.client.hmget(self.names.inflight_data, unknown) if unknown else []
        stored = dict(zip(unknown, raw, strict=True))
        for i, result in results:
            inflight = known.get(result.id)
            if inflight is None:
                blob = stored.get(result.id)
                if blob is None:
                    continue  # already answered (a late or duplicate result): nothing to do
                inflight = decode_as(Inflight, {b"m": blob})
            if result.ok:
                self._finish(out[i], inflight, self._reply(inflight, result))
                if result.confidence >= self.settings.qos.learn_min_confidence and inflight.embedding:
                    self.learner.add(result.model, inflight.embedding)
            elif result.attempt >= inflight.attempt:
                await self._retry_or_fail(out[i], inflight, f"worker {result.worker} failed: {result.error}")
        return out

    def _reply(self, inflight: Inflight, result: Result) -> dict[str, Any]:
        return generation_reply(_reply_template(inflight), result, inflight.query.arrived_ms, time.time() * 1000)

    def _finish(self, effects: Effects, inflight: Inflight, reply: dict[str, Any]) -> None:
        query = inflight.query
        if reply.get("status") == "ok":
            effects.call(lambda p: self.cache.store(p, query, _whole(inflight), inflight.domain, reply))
        effects.call(lambda p: self.replies.deliver(p, query.id, query.reply_to, reply))
        effects.call(lambda p: p.hdel(self.names.inflight_data, query.id))
        effects.call(lambda p: p.zrem(self.names.inflight, query.id))
        self._dispatched.pop(query.id, None)

    async def _retry_or_fail(self, effects: Effects, inflight: Inflight, reason: str) -> None:
        if inflight.attempt < self.settings.executor.max_attempts:
            log.warning("query %s attempt %d: %s; retrying", inflight.query.id, inflight.attempt, reason,
                        extra={"query_id": inflight.query.id})
            retry = Inflight(query=inflight.query, decision=inflight.decision, domain=inflight.domain,
                             attempt=inflight.attempt + 1, dispatched_ms=inflight.dispatched_ms, stamps=inflight.stamps,
                             embedding=inflight.embedding, embedding_truncated=inflight.embedding_truncated)
            await self._dispatch(retry, effects)
            return
        final = f"{reason} (after {inflight.attempt} attempts)"
        log.error("query %s failed: %s", inflight.query.id, final, extra={"query_id": inflight.query.id})
        dead = Entry(self.names.execute, inflight.query.entry_id, {b"m": encode(inflight)[b"m"]})
        effects.xadd(self.names.dead, dead_letter_fields(dead, final, "executor"),
                     maxlen=self.settings.streams.dead_maxlen)
        reply = query_rejection(inflight.query, final, status="error")
        reply.update(model=inflight.decision.model, attempts=inflight.attempt, domain=inflight.domain)
        self._finish(effects, inflight, reply)

    # -- timeouts ------------------------------------------------------------------
    async def sweep(self) -> None:
        """Retry (or fail) every dispatched query whose attempt deadline has passed.

        One round trip claims the expired ids (ZREM: only one executor wins each) and reads their
        bookkeeping; one transaction writes every retry or failure.
        """
        now_ms = time.time() * 1000
        self._forget_older_than(now_ms - 1000 * self.settings.executor.attempt_timeout_s
                                * (self.settings.executor.max_attempts + 1))
        expired: list[Any] = await self.rt.client.zrangebyscore(self.names.inflight, "-inf", now_ms, start=0, num=100)
        if not expired:
            return
        ids = [raw.decode() if isinstance(raw, bytes) else str(raw) for raw in expired]
        pipe = self.rt.client.pipeline(transaction=False)
        for query_id in ids:
            pipe.zrem(self.names.inflight, query_id)
        pipe.hmget(self.names.inflight_data, ids)
        *claimed, blobs = await pipe.execute()
        effects = Effects()
        timeout_s = self.settings.executor.attempt_timeout_s
        unreadable: list[str] = []
        for query_id, won, blob in zip(ids, claimed, blobs, strict=True):
            if not won or blob is None:
                continue  # another executor took it, or it was answered meanwhile
            try:
                inflight = decode_as(Inflight, {b"m": blob})
            except DecodeError:
                unreadable.append(query_id)
                continue
            reason = f"no result within {timeout_s:g}s from model {self.model_for(inflight)}"
            await self._retry_or_fail(effects, inflight, reason)
        if unreadable:
            effects.call(lambda p: p.hdel(self.names.inflight_data, *unreadable))
        if effects.ops:
            pipe = self.rt.client.pipeline(transaction=True)
            for op in effects.ops:
                op(pipe)
            await pipe.execute()

    def _forget_older_than(self, cutoff_ms: float) -> None:
        """Drop own records dispatched before ``cutoff_ms``: by then every attempt has timed out, so another
        executor's sweep has finished them (oldest first: records are kept in the order of their last attempt)."""
        while self._dispatched:
            query_id, inflight = next(iter(self._dispatched.items()))
            if inflight.dispatched_ms >= cutoff_ms:
                return
            del self._dispatched[query_id]


def _reply_template(inflight: Inflight) -> dict[str, Any]:
    """The reply's fields known at dispatch: the query, its route and the decision (see ``generation_reply``)."""
    query = inflight.query
    dispatched = inflight.stamps.get("executor_ms", inflight.dispatched_ms)
    return {
        "id": query.id, "route_ms": max(0.0, dispatched - query.arrived_ms), "domain": inflight.domain,
        "slo_met": inflight.decision.slo_met, "reason": inflight.decision.reason,
        "attempts": inflight.attempt, **stage_times(inflight),
    }


def _whole(message: Planned | Inflight) -> bytes:
    """The message's embedding when it is of the whole prompt (what the semantic cache compares), else b""."""
    return b"" if message.embedding_truncated else message.embedding


async def start(rt: ProcessRuntime) -> Executor:
    executor = Executor(rt)
    executor.install()
    return executor
