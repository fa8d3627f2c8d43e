"""Retention of consumed stream entries: trim what every consumer group has acknowledged, after a grace period."""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis


def id_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a sortable (ms, seq) pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _valid(entry_id: Any) -> str | None:
    text = as_text(entry_id) if entry_id is not None else ""
    try:
        id_key(text)
    except ValueError:
        return None
    return text


def as_text(value: Any) -> str:
    """A reply value (bytes or not) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def consumed_bound(client: aioredis.Redis, stream: str) -> str | None:
    """The id below which every group of ``stream`` has acknowledged everything (None: no group yet).

    Per group: its oldest pending entry if any is pending, else its last-delivered id; the minimum
    over groups. Entries not yet delivered are always above it.
    """
    groups: Any = await client.xinfo_groups(stream)
    bounds: list[str] = []
    for group in groups:
        name = as_text(group.get("name"))
        bound = _valid(group.get("last-delivered-id")) or "0-0"
        if int(group.get("pending") or 0) > 0:
            summary: Any = await client.xpending(stream, name)
            oldest = _valid(summary.get("min")) if isinstance(summary, dict) else None
            if oldest is not None:  # None: the pending entries were acknowledged meanwhile
                bound = min(bound, oldest, key=id_key)
        bounds.append(bound)
    return min(bounds, key=id_key) if bounds else None


async def trim_acknowledged(client: aioredis.Redis, stream: str, retain_s: float, now_ms: float | None = None) -> int:
    """Delete entries every group acknowledged that are older than ``retain_s``; returns how many went."""
    bound = await consumed_bound(client, stream)
    if bound is None:
        return 0
    now = time.time() * 1000 if now_ms is None else now_ms
    horizon = f"{max(0, int(now - retain_s * 1000))}-0"
    minid = min(bound, horizon, key=id_key)
    if id_key(minid) <= (0, 0):
        return 0
    removed: Any = await client.xtrim(stream, minid=minid, approximate=False)
    return int(removed or 0)
