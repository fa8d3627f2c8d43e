"""Building the contract's reply records (shared by the actors that answer queries)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from broker.codec import decode
from broker.effects import Effects, Entry
from broker.errors import DecodeError
from broker.messages import Embedded, Inflight, Planned, Query, Scored
from broker.replies import ReplyBook


def rejection(query_id: str, reason: str, arrived_ms: float, status: str = "rejected") -> dict[str, Any]:
    """A reply for a query that was not (or could not be) answered by a model."""
    now_ms = time.time() * 1000
    return {
        "id": query_id, "status": status, "text": "", "model": "", "worker": "", "cached": False,
        "latency_ms": max(0.0, now_ms - arrived_ms) if arrived_ms else 0.0, "route_ms": 0.0, "queue_ms": 0.0,
        "inference_ms": 0.0, "tokens_in": 0, "tokens_out": 0, "energy_j": 0.0, "energy_source": "",
        "confidence": 0.0, "error": reason,
    }


# The pipeline's stamps (epoch ms) and the reply fields that give each one as ms after the query arrived.
STAGE_FIELDS = {"monitor_ms": "at_monitor_ms", "embedded_ms": "at_embedded_ms", "analyzer_ms": "at_analyzer_ms",
                "planner_ms": "at_planner_ms"}


def stage_times(inflight: Inflight) -> dict[str, float]:
    """Where route_ms went: ms after arrival at which the monitor claimed the query, its embedding was done,
    and the analyzer and planner sent it on (only the stages it passed)."""
    arrived = inflight.query.arrived_ms
    return {field: round(max(0.0, inflight.stamps[stamp] - arrived), 3)
            for stamp, field in STAGE_FIELDS.items() if stamp in inflight.stamps}


def query_rejection(query: Query, reason: str, status: str = "rejected") -> dict[str, Any]:
    return rejection(query.id, reason, query.arrived_ms, status)


def answer_dead_query(replies: ReplyBook) -> Callable[[Entry, str, Effects], None]:
    """A dead-letter hook: when a pipeline message that carries a query dies, its sender still gets an error."""

    def hook(entry: Entry, reason: str, effects: Effects) -> None:
        try:
            message = decode(entry.fields, entry.id, entry.stream)
        except DecodeError:
            return
        if isinstance(message, (Embedded, Scored, Planned, Inflight)):
            query = message.query
            reply = query_rejection(query, f"could not be processed: {reason}", status="error")
            effects.call(lambda p: replies.deliver(p, query.id, query.reply_to, reply))

    return hook
