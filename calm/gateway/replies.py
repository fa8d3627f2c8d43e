"""One private reply stream per gateway process, read by one task that resolves waiters by query id."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.names import Names

log = logging.getLogger(__name__)
READ_BLOCK_MS = 1000
TRIM_INTERVAL_S = 5.0
ORPHAN_TTL_S = 3600  # a crashed gateway's reply stream disappears after this long


class ReplyRouter:
    """Sends queries with ``reply_to`` set to this gateway's stream and hands each reply to its waiters.

    Several HTTP requests may wait for the same query id (a repeated idempotency key): the pipeline
    writes one reply per stream, so every waiter of that id gets the same reply.
    """

    def __init__(self, writer: aioredis.Redis, reader: aioredis.Redis, names: Names, tag: str | None = None) -> None:
        self.writer = writer
        self.reader = reader
        self.names = names
        self.stream = f"{names.replies}:gw-{tag or _instance()}"
        self._waiters: dict[str, list[asyncio.Future[dict[str, str]]]] = {}
        self._cursor = "0-0"
        self._task: asyncio.Task[None] | None = None
        self.connected = False
        self.replies_seen = 0
        self.orphans = 0  # replies nobody waited for any more (the request timed out or went away)

    @property
    def inflight(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    async def start(self) -> None:
        await self.reader.ping()
        self.connected = True
        self._task = asyncio.create_task(self._run(), name="gateway:replies")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(ConnectionError("gateway shutting down"))
        self._waiters.clear()
        with contextlib.suppress(Exception):
            await self.writer.delete(self.stream)

    async def submit(self, fields: Mapping[str, str]) -> asyncio.Future[dict[str, str]]:
        """XADD one query (``fields`` must hold ``id``); returns a future for its reply."""
        query_id = fields["id"]
        fut: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(query_id, []).append(fut)
        try:
            entry: dict[Any, Any] = {**fields, "reply_to": self.stream}
            await self.writer.xadd(self.names.queries, entry)
        except BaseException:
            self.forget(query_id, fut)
            raise
        return fut

    async def wait(self, query_id: str, fut: asyncio.Future[dict[str, str]], timeout_s: float) -> dict[str, str]:
        """The reply, or :class:`TimeoutError` after ``timeout_s``; the waiter is removed either way."""
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        finally:
            self.forget(query_id, fut)

    def forget(self, query_id: str, fut: asyncio.Future[dict[str, str]]) -> None:
        waiters = self._waiters.get(query_id)
        if waiters and fut in waiters:
            waiters.remove(fut)
            if not waiters:
                del self._waiters[query_id]
        if not fut.done():
            fut.cancel()

    def _resolve(self, reply: dict[str, str]) -> None:
        self.replies_seen += 1
        waiters = self._waiters.pop(reply.get("id", ""), [])
        if not waiters:
            self.orphans += 1
            log.debug("reply nobody waits for", extra={"query_id": reply.get("id")})
        for fut in waiters:
            if not fut.done():
                fut.set_result(reply)

    async def _run(self) -> None:
        failures = 0
        last_trim = time.monotonic()
        while True:
            try:
                rows: Any = await self.reader.xread({self.stream: self._cursor}, count=500, block=READ_BLOCK_MS)
                self.connected = True
                failures = 0
                for _stream, items in rows or []:
                    for entry_id, fields in items:
                        self._cursor = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                        self._resolve({k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()})
                if time.monotonic() - last_trim > TRIM_INTERVAL_S:
                    last_trim = time.monotonic()
                    await self._trim()
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                self.connected = False
                failures += 1
                delay = min(2.0, 0.05 * 2**failures) * (0.5 + random.random())
                log.warning("reply stream read failed (%s); retrying in %.2fs", e, delay)
                await asyncio.sleep(delay)

    async def _trim(self) -> None:
        """Drop replies already read, and let the stream expire should this process die."""
        pipe = self.writer.pipeline(transaction=False)
        pipe.xtrim(self.stream, minid=self._cursor)
        pipe.expire(self.stream, ORPHAN_TTL_S)
        await pipe.execute()


def _instance() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
