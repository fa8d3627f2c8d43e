"""What a live run recorded about residency: worker events, planner decisions, and figures derived from them."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from broker.codec import decode
from broker.errors import DecodeError
from broker.messages import WorkerEvent
from broker.names import Names


@dataclass(frozen=True, slots=True)
class Residency:
    """One stretch of time a model was loaded on a worker (``end_ms`` is the run's end if never evicted)."""

    worker: str
    model: str
    start_ms: float
    end_ms: float


async def worker_events(client: aioredis.Redis, names: Names) -> list[dict[str, Any]]:
    """Every worker event on the scheduler stream, oldest first, as plain dicts (``at_ms`` from the entry id)."""
    rows: Any = await client.xrange(names.sched, count=1_000_000)
    events = []
    for entry_id, fields in rows:
        try:
            message = decode(fields)
        except DecodeError:
            continue
        if isinstance(message, WorkerEvent):
            events.append({"at_ms": float(entry_id.decode().split("-")[0]), "worker": message.worker,
                           "event": message.event, "model": message.model, "detail": message.detail,
                           "memory_mb": message.memory_mb})
    return events


async def decisions(client: aioredis.Redis, names: Names, ids: Collection[str]) -> list[dict[str, Any]]:
    """The planner's decisions for the queries ``ids``: chosen model and whether it was loaded then."""
    wanted = set(ids)
    rows: Any = await client.xrange(names.decisions, count=1_000_000)
    out = []
    for entry_id, fields in rows:
        row = {k.decode(): v.decode() for k, v in fields.items()}
        if row.get("id") not in wanted:
            continue
        candidates = json.loads(row.get("candidates") or "[]")
        chosen: dict[str, Any] = next((c for c in candidates if c.get("model") == row.get("model")), {})
        out.append({"at_ms": float(entry_id.decode().split("-")[0]), "id": row["id"], "model": row.get("model", ""),
                    "loaded": bool(chosen.get("loaded", False)), "domain": row.get("domain", "")})
    return out


def residency_intervals(events: Sequence[dict[str, Any]], end_ms: float) -> list[Residency]:
    """Pair each worker's ``loaded`` events with the next ``evicted`` (or ``stopping``) of the same model."""
    open_at: dict[tuple[str, str], float] = {}
    out: list[Residency] = []
    for e in sorted(events, key=lambda e: e["at_ms"]):
        key = (e["worker"], e["model"])
        if e["event"] == "loaded" and key not in open_at:
            open_at[key] = e["at_ms"]
        elif e["event"] == "evicted" and key in open_at:
            out.append(Residency(*key, open_at.pop(key), e["at_ms"]))
        elif e["event"] == "stopping":
            for k in [k for k in open_at if k[0] == e["worker"]]:
                out.append(Residency(*k, open_at.pop(k), e["at_ms"]))
    out.extend(Residency(w, m, start, max(start, end_ms)) for (w, m), start in open_at.items())
    return sorted(out, key=lambda r: (r.start_ms, r.worker, r.model))


def cold_load_counts(events: Sequence[dict[str, Any]], chosen: Sequence[dict[str, Any]], started_ms: float,
                     ended_ms: float) -> dict[str, Any]:
    """The simulator's figures, from what the live run recorded between ``started_ms`` and ``ended_ms``.

    ``cold_loads``: decisions whose model was not loaded when the planner chose it; ``loads`` and
    ``evictions``: worker events (an eviction because the worker stopped is not counted).
    """
    window = [e for e in events if started_ms <= e["at_ms"] <= ended_ms]
    loads = [e for e in window if e["event"] == "loaded" and e["detail"] != "already loaded"]
    evictions = [e for e in window if e["event"] == "evicted" and e["detail"] not in ("worker stopping",
                                                                                       "was not loaded")]
    cold = sum(1 for d in chosen if not d["loaded"])
    return {"cold_loads": cold, "cold_load_rate": round(cold / len(chosen), 4) if chosen else 0.0,
            "loads": len(loads), "evictions": len(evictions), "decisions": len(chosen),
            "load_failed": sum(1 for e in window if e["event"] == "load_failed")}
