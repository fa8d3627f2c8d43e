"""Replays a workload against the live system, open loop, and records every reply."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from rich.progress import Progress

from broker.names import Names
from calm.client import ReplyCollector
from calm.workload import Item


@dataclass(slots=True)
class Run:
    """One strategy's pass over a workload: what was sent and what came back."""

    strategy: str
    items: list[Item]
    ids: list[str]
    replies: dict[str, dict[str, str]]
    started_ms: float
    ended_ms: float
    duplicates: int = 0
    pinned: str | None = None
    notes: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # worker events recorded during the run
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per system process during the replay


async def replay(client: aioredis.Redis, names: Names, items: Sequence[Item], strategy: str, pin: str | None = None,
                 timeout_s: float = 120.0, progress: bool = True, pins: Sequence[str] | None = None) -> Run:
    """Send ``items`` at their times (pinned to ``pin``, or each to its entry of ``pins``, if given) and wait for
    every reply (or the timeout)."""
    if pins is not None and len(pins) != len(items):
        raise ValueError(f"{len(pins)} pins for {len(items)} items")
    collector = ReplyCollector(client, names, f"bench-{strategy}")
    run_tag = uuid.uuid4().hex[:8]
    ids = [f"{strategy}-{run_tag}-{i}" for i in range(len(items))]
    started = time.time()
    t0 = time.monotonic()
    sending_done = asyncio.Event()

    async def sender() -> None:
        for i, (qid, item) in enumerate(zip(ids, items, strict=True)):
            delay = t0 + item.t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await collector.send(item.prompt, qid, model=pins[i] if pins is not None else pin,
                                 max_new_tokens=item.max_new_tokens)
        sending_done.set()

    send_task = asyncio.create_task(sender())
    deadline: float | None = None
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"{strategy}: replies", total=len(ids))
        while len(collector.replies) < len(ids):
            if sending_done.is_set() and deadline is None:
                deadline = time.monotonic() + timeout_s
            if deadline is not None and time.monotonic() > deadline:
                break
            await collector.poll(block_ms=100)
            bar.update(task, completed=len(collector.replies))
    await send_task
    ended = time.time()
    await collector.close()
    return Run(strategy, list(items), ids, dict(collector.replies), started * 1000, ended * 1000,
               duplicates=len(collector.extra), pinned=pin)
