"""A stand-in for CALM's actors and one worker, for gateway tests that need replies but no models.

It reads ``calm:queries`` like the monitor does (the same ingress rules), answers on each query's
``reply_to`` with every contract reply field, and writes what the real pipeline writes alongside:
a routing decision, an inference result, model QoS in the KB, and a live worker with heartbeats.
Prompts starting ``hang`` get no reply, ``flood`` are shed as overloaded, ``cached:`` are exact cache hits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis

from broker.codec import encode, ingress_fields
from broker.config import Settings
from broker.errors import DecodeError, ValidationError
from broker.ingress import parse_query, query_id, reply_stream
from broker.kb import KnowledgeBase, WorkerState
from broker.messages import Result, WorkerEvent
from broker.names import Names

MODELS = {"arith": ["arithmetic"], "sort": ["sorting"], "generalist": ["arithmetic", "sorting"]}
WORKER = "stub-w1"


class StubPipeline:
    def __init__(self, client: aioredis.Redis, settings: Settings, with_worker: bool = True) -> None:
        self.client = client
        self.settings = settings
        self.names = Names(settings.redis.prefix)
        self.kb = KnowledgeBase(client, self.names)
        self.with_worker = with_worker
        self.seen: list[dict[str, Any]] = []  # the ingress fields of every query read
        self._arrived = asyncio.Condition()
        self._cursor = "0-0"

    async def register(self) -> None:
        pipe = self.client.pipeline(transaction=True)
        for name, domains in MODELS.items():
            self.kb.register_model(pipe, name, {"description": f"{name} specialist", "domains": domains,
                                                "baseline": name == "generalist"})
        if self.with_worker:
            self.kb.register_worker(pipe, WorkerState(id=WORKER, models_loaded=("arith", "sort"),
                                                      models_servable=tuple(MODELS), memory_budget_mb=100,
                                                      memory_used_mb=40), ttl_s=5)
            for name in ("arith", "sort"):
                self.kb.set_loaded(pipe, name, WORKER, True)
        self.kb.actor_heartbeat(pipe, "monitor", "stub-monitor", 1, ttl_s=30)
        await pipe.execute()
        if self.with_worker:
            await self.client.xadd(self.names.sched, encode(WorkerEvent(worker=WORKER, event="loaded", model="arith",
                                                                        detail="0.1s", memory_mb=20)))

    async def wait_seen(self, match: Callable[[dict[str, Any]], bool]) -> None:
        """Until a query that ``match`` accepts has been read."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: any(match(q) for q in self.seen))

    async def run(self) -> None:
        last_beat = 0.0
        while True:
            if self.with_worker and time.monotonic() - last_beat > 1.0:
                last_beat = time.monotonic()
                pipe = self.client.pipeline(transaction=False)
                self.kb.heartbeat(pipe, WORKER, 5, models_loaded=["arith", "sort"], state="up")
                await pipe.execute()
            rows: Any = await self.client.xread({self.names.queries: self._cursor}, count=100, block=200)
            batch: dict[tuple[str, str], dict[str, str]] = {}
            for _stream, items in rows or []:
                for entry_id, fields in items:
                    self._cursor = entry_id.decode()
                    reply = await self._answer(self._cursor, fields)
                    if reply is not None:
                        batch[(reply["id"], reply.pop("_reply_to"))] = reply
            for (_qid, reply_to), reply in batch.items():  # one reply per id and stream, like the Lua delivery
                await self.client.xadd(reply_to, reply)  # type: ignore[arg-type]

    async def _answer(self, entry_id: str, fields: dict[bytes, bytes]) -> dict[str, str] | None:
        try:
            values = ingress_fields(fields, entry_id)
        except DecodeError:
            return None
        async with self._arrived:
            self.seen.append(values)
            self._arrived.notify_all()
        target = reply_stream(values, self.names)
        if target is None:
            return None
        qid = query_id(values, entry_id)
        try:
            query = parse_query(values, entry_id, self.names, self.settings.ingress)
        except ValidationError as e:
            return _reply(qid, target, status="rejected", error=str(e))
        if query.model is not None and query.model not in MODELS:
            return _reply(qid, target, status="rejected", error=f"unknown model {query.model!r}")
        if query.prompt.startswith("hang"):
            return None
        if query.prompt.startswith("flood"):
            await self.client.hincrby(self.names.counters, "shed_overloaded", 1)
            reason = "overloaded: every eligible model has 64+ queries waiting"
            return _reply(qid, target, status="rejected", error=reason)
        model = query.model or ("sort" if query.prompt.startswith("sort") else "arith")
        cached = query.prompt.startswith("cached:")
        text = f"echo:{query.prompt}"[: 4 * query.max_new_tokens]
        tokens_out = min(len(text), query.max_new_tokens)
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(self.names.decisions, {
            "id": qid, "model": model, "reason": "best utility", "utility": "0.8123", "slo_met": "1",
            "domain": MODELS[model][0], "strategy": "utility",
            "candidates": json.dumps([{"model": m, "fit": 0.9 if m == model else 0.3, "latency_ms": 12.0,
                                       "energy_j": 0.01, "quality": 0.9, "error_rate": 0.0, "loaded": True,
                                       "queue": 0, "utility": 0.8 if m == model else 0.2} for m in MODELS])})
        if cached:
            pipe.hincrby(self.names.counters, "cache_hits_exact", 1)
        else:
            result = Result(id=qid, attempt=1, model=model, worker=WORKER, ok=True, text=text,
                            tokens_in=len(query.prompt), tokens_out=tokens_out, queue_ms=1.0, inference_ms=5.0,
                            energy_j=0.02, energy_source="estimate", confidence=0.75, finish_reason="stop")
            pipe.xadd(self.names.results, encode(result))
            self.kb.record_qos(pipe, model, 0.2, {"latency_ms": 6.0, "energy_j": 0.02, "confidence": 0.75}, True, 100)
        await pipe.execute()
        return _reply(qid, target, status="ok", text=text, model=model, worker="" if cached else WORKER,
                      cached="1" if cached else "0", tokens_in=str(len(query.prompt)), tokens_out=str(tokens_out),
                      energy_j="0" if cached else "0.02", **({"cache": "exact"} if cached else {}))


def _reply(qid: str, reply_to: str, **fields: str) -> dict[str, str]:
    base = {"id": qid, "status": "ok", "text": "", "model": "", "worker": "", "cached": "0", "latency_ms": "7.5",
            "route_ms": "1.25", "queue_ms": "1.0", "inference_ms": "5.0", "tokens_in": "0", "tokens_out": "0",
            "energy_j": "0", "energy_source": "estimate", "confidence": "0.75", "error": "", "domain": "arithmetic",
            "slo_met": "1", "reason": "best utility", "attempts": "1", "finish_reason": "stop", "_reply_to": reply_to}
    base.update(fields)
    return base


@contextlib.asynccontextmanager
async def running_stub(client: aioredis.Redis, settings: Settings, with_worker: bool = True
                       ) -> AsyncIterator[StubPipeline]:
    stub = StubPipeline(client, settings, with_worker)
    await stub.register()
    task = asyncio.create_task(stub.run())
    try:
        yield stub
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
