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
