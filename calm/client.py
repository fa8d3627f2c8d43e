"""A small client of CALM's streams: push queries onto ``calm:queries`` and collect their replies."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis

from broker.names import Names


class ReplyCollector:
    """Sends queries with a private ``reply_to`` stream and gathers one reply per query id."""

    def __init__(self, client: aioredis.Redis, names: Names, tag: str | None = None) -> None:
        self.client = client
        self.names = names
        self.reply_to = f"{names.replies}:{tag or 'client'}-{uuid.uuid4().hex[:12]}"
        self.replies: dict[str, dict[str, str]] = {}
        self.extra: list[dict[str, str]] = []  # replies beyond the first for one id (must not happen)
        self._cursor = "0-0"

    async def send(self, prompt: str, query_id: str | None = None, **fields: Any) -> str:
        """XADD one query; returns its id."""
        qid = query_id or uuid.uuid4().hex
        entry = {"prompt": prompt, "id": qid, "reply_to": self.reply_to}
        entry.update({k: str(v) for k, v in fields.items() if v is not None})
        await self.client.xadd(self.names.queries, entry)  # type: ignore[arg-type]
        return qid

    async def poll(self, block_ms: int = 200) -> int:
        """Read replies that arrived; returns how many."""
        rows: Any = await self.client.xread({self.reply_to: self._cursor}, count=1000, block=block_ms)
        count = 0
        for _stream, items in rows or []:
            for entry_id, fields in items:
                self._cursor = entry_id
                reply = {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()}
                reply.setdefault("received_ms", f"{time.time() * 1000:.3f}")
                if reply.get("id") in self.replies:
                    self.extra.append(reply)
                else:
                    self.replies[reply.get("id", "")] = reply
                count += 1
        return count

    async def wait_for(self, ids: set[str] | list[str], timeout_s: float) -> dict[str, dict[str, str]]:
        """Replies for ``ids`` (those that came within ``timeout_s``)."""
        wanted = set(ids)
        deadline = time.monotonic() + timeout_s
        while not wanted <= set(self.replies) and time.monotonic() < deadline:
            await self.poll(block_ms=int(max(1, min(500, (deadline - time.monotonic()) * 1000))))
        return {i: self.replies[i] for i in wanted if i in self.replies}

    async def close(self) -> None:
        await self.client.delete(self.reply_to)


async def ask(client: aioredis.Redis, names: Names, prompt: str, timeout_s: float = 60.0,
              **fields: Any) -> Mapping[str, str]:
    """Send one query and wait for its reply; raises TimeoutError when none comes."""
    collector = ReplyCollector(client, names, "cli")
    try:
        qid = await collector.send(prompt, **fields)
        replies = await collector.wait_for([qid], timeout_s)
        if qid not in replies:
            raise TimeoutError(f"no reply within {timeout_s:g}s (is 'calm up' running?)")
        return replies[qid]
    finally:
        await collector.close()

