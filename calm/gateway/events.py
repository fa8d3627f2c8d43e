"""Follows the system's event streams and keeps counts of what happened since this gateway started.

Read without a consumer group (XREAD from the last id seen), so following them takes nothing from
the actors that consume them: ``calm:results`` (every inference: tokens, energy, worker), ``calm:sched``
(worker events: loads, evictions), ``calm:dead`` (dead letters) and ``calm:decisions`` (routing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker.codec import decode
from broker.errors import DecodeError
from broker.ingress import entry_ms
from broker.messages import Result, WorkerEvent
from broker.names import Names

log = logging.getLogger(__name__)
BUCKET_S = 2.0
BUCKETS = 90  # three minutes of history for the dashboard's charts
RECENT_DECISIONS = 20
NO_OP_DETAILS = ("already loaded", "was not loaded")  # worker events that changed nothing
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"\d+(\.\d+)?")


def reason_class(reason: str) -> str:
    """A dead-letter reason with quoted names and numbers masked, so it is a bounded label value."""
    text = _NUMBER.sub("N", _QUOTED.sub("_", reason.split(":", 1)[0].strip()))
    return text[:80] or "unknown"


@dataclass(slots=True)
class Bucket:
    """Inference results that finished within one time bucket."""

    count: int = 0
    errors: int = 0
    latency_ms: float = 0.0  # sums: queue + inference time
    energy_j: float = 0.0
    confidence: float = 0.0
    models: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class EventCounts:
    """What the followed streams showed since this gateway started."""

    inferences: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (model, worker, ok)
    energy_j: dict[tuple[str, str], float] = field(default_factory=dict)  # (model, source) -> joules
    tokens: Counter[tuple[str, str]] = field(default_factory=Counter)  # (model, "in" | "out")
    worker_events: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (event, model, worker)
    dead: Counter[tuple[str, str]] = field(default_factory=Counter)  # (actor, reason class)
    decisions: Counter[tuple[str, str]] = field(default_factory=Counter)  # (model, domain)
    domains: Counter[str] = field(default_factory=Counter)
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_DECISIONS))
    buckets: dict[int, Bucket] = field(default_factory=dict)


class EventTail:
    """One task reading four streams with a single blocking XREAD, folding entries into :class:`EventCounts`."""

    def __init__(self, reader: aioredis.Redis, names: Names) -> None:
        self.reader = reader
        self.names = names
        self.counts = EventCounts()
        self._cursors: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        streams = (self.names.results, self.names.sched, self.names.dead, self.names.decisions)
        for stream in streams:
            last: Any = await self.reader.xrevrange(stream, count=1)
            self._cursors[stream] = _text(last[0][0]) if last else "0-0"
        seed: Any = await self.reader.xrevrange(self.names.decisions, count=RECENT_DECISIONS)
        for entry_id, fields in reversed(seed):
            self.counts.recent.append(_decision(_text(entry_id), fields))
        self._task = asyncio.create_task(self._run(), name="gateway:events")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                streams: dict[Any, Any] = dict(self._cursors)
                rows: Any = await self.reader.xread(streams, count=1000, block=1000)
                failures = 0
            except (RedisError, OSError) as e:
                failures += 1
                delay = min(2.0, 0.05 * 2**failures) * (0.5 + random.random())
                log.warning("event stream read failed (%s); retrying in %.2fs", e, delay)
                await asyncio.sleep(delay)
                continue
            for raw_stream, items in rows or []:
                stream = _text(raw_stream)
                for entry_id, fields in items:
                    self._cursors[stream] = _text(entry_id)
                    self.fold(stream, _text(entry_id), fields)

    def fold(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> None:
        """Count one entry of ``stream``."""
        if stream == self.names.dead:
            actor = _text(fields.get(b"actor", b"?"))
            self.counts.dead[(actor, reason_class(_text(fields.get(b"reason", b""))))] += 1
        elif stream == self.names.decisions:
            decision = _decision(entry_id, fields)
            self.counts.recent.append(decision)
            self.counts.decisions[(decision["model"], decision["domain"])] += 1
            self.counts.domains[decision["domain"] or "?"] += 1
        else:
            try:
                message = decode(fields)
            except DecodeError:
                return
            if isinstance(message, Result):
                self._result(message)
            elif isinstance(message, WorkerEvent) and message.detail not in NO_OP_DETAILS:
                self.counts.worker_events[(message.event, message.model, message.worker)] += 1

    def _result(self, result: Result) -> None:
        c = self.counts
        c.inferences[(result.model, result.worker, "true" if result.ok else "false")] += 1
        key_e = (result.model, result.energy_source)
        c.energy_j[key_e] = c.energy_j.get(key_e, 0.0) + result.energy_j
        c.tokens[(result.model, "in")] += result.tokens_in
        c.tokens[(result.model, "out")] += result.tokens_out
        key = int(time.time() // BUCKET_S)
        bucket = c.buckets.get(key)
        if bucket is None:
            bucket = c.buckets[key] = Bucket()
            for old in [k for k in c.buckets if k <= key - BUCKETS]:
                del c.buckets[old]
        bucket.count += 1
        bucket.models[result.model] += 1
        if not result.ok:
            bucket.errors += 1
            return
        bucket.latency_ms += result.queue_ms + result.inference_ms
        bucket.energy_j += result.energy_j
        bucket.confidence += result.confidence

    def series(self) -> list[dict[str, Any]]:
        """Per-bucket means, oldest first, over the last :data:`BUCKETS` buckets (empty buckets included)."""
        now = int(time.time() // BUCKET_S)
        out = []
        for key in range(now - BUCKETS + 1, now + 1):
            b = self.counts.buckets.get(key, Bucket())
            good = max(b.count - b.errors, 0)
            out.append({
                "t": key * BUCKET_S, "queries": b.count, "errors": b.errors, "qps": round(b.count / BUCKET_S, 3),
                "latency_ms": round(b.latency_ms / good, 2) if good else None,
                "energy_j": round(b.energy_j / good, 5) if good else None,
                "confidence": round(b.confidence / good, 4) if good else None,
            })
        return out


def _decision(entry_id: str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {_text(k): _text(v) for k, v in fields.items() if k != b"candidates"}
    out["at_ms"] = entry_ms(entry_id)
    try:
        out["candidates"] = json.loads(fields.get(b"candidates", b"[]"))
    except ValueError:
        out["candidates"] = []
    out.setdefault("model", "")
    out.setdefault("domain", "")
    return out


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
