"""A consumer-group reader: batched XREADGROUP, ack with effects, reclaim of dead peers' entries.

Delivery is at-least-once. Handlers return :class:`Effects`; the consumer applies all effects of a
batch and the XACKs in one MULTI/EXEC pipeline. Entries whose handler raised stay pending; the
reclaim task hands entries idle longer than ``reclaim_idle_ms`` to this consumer again, and
dead-letters an entry once it was delivered ``max_deliveries`` times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.config import StreamSettings
from broker.effects import Effects, Entry
from broker.errors import DecodeError, ValidationError
from broker.names import Names
from broker.retention import as_text, id_key, trim_acknowledged

log = logging.getLogger(__name__)

Handler = Callable[[Entry], Awaitable[Effects | None]]
BatchHandler = Callable[[list[Entry]], Awaitable[Sequence[Effects | None]]]
DeadHook = Callable[[Entry, str, Effects], None]


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """Which stream and group to read, as whom, and on whose behalf (for dead letters)."""

    stream: str
    group: str
    consumer: str
    actor: str


async def ensure_group(client: aioredis.Redis, stream: str, group: str, start: str = "0") -> None:
    """Create ``group`` on ``stream`` (and the stream) unless it exists."""
    try:
        await client.xgroup_create(stream, group, id=start, mkstream=True)
    except ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


async def wake_readers(client: aioredis.Redis, consumers: Sequence[StreamConsumer]) -> None:
    """End the consumers' blocked reads now (``CLIENT UNBLOCK``: each returns empty and delivers nothing).

    After :meth:`StreamConsumer.stop`, a consumer then ends at once instead of when its read times out
    (up to ``block_ms``). One ``CLIENT LIST`` finds every reader by its client name, one pipeline
    unblocks them. Best effort: where the server refuses ``CLIENT`` commands, reads time out as before.
    """
    names = {c.reader_name for c in consumers if c.reader_name is not None}
    if not names:
        return
    try:
        clients: Any = await client.client_list()
        ids = [int(found["id"]) for found in clients if as_text(found.get("name", "")) in names]
        if ids:
            pipe = client.pipeline(transaction=False)
            for client_id in ids:
                pipe.client_unblock(client_id)
            await pipe.execute()
    except (ResponseError, RedisConnectionError, RedisTimeoutError, OSError) as e:
        log.debug("could not wake %d stream readers: %s", len(names), e)


class StreamConsumer:
    """Reads one stream as one consumer of a group and applies a handler's effects with the ack."""

    def __init__(
        self,
        reader: aioredis.Redis,
        writer: aioredis.Redis,
        spec: ConsumerSpec,
        names: Names,
        settings: StreamSettings,
        *,
        handler: Handler | None = None,
        batch_handler: BatchHandler | None = None,
        on_dead: DeadHook | None = None,
        batch: int | None = None,
        block_ms: int | None = None,
        trim_acked: bool = False,
        reader_name: str | None = None,
    ) -> None:
        if (handler is None) == (batch_handler is None):
            raise ValueError("give exactly one of handler and batch_handler")
        self.reader = reader
        self.writer = writer
        self.spec = spec
        self.names = names
        self.settings = settings
        self._handler = handler
        self._batch_handler = batch_handler
        self._on_dead = on_dead
        self._batch = batch or settings.batch
        self._block_ms = block_ms or settings.block_ms
        self._trim_acked = trim_acked and settings.retain_acked_s > 0
        self.reader_name = reader_name  # the reader's CLIENT SETNAME: how `wake_readers` finds its blocked read
        self._stop = asyncio.Event()
        self._reclaimed: asyncio.Queue[list[Entry]] = asyncio.Queue()
        self.processed = 0

    def stop(self) -> None:
        """Stop reading; the current batch is finished first."""
        self._stop.set()

    async def wake(self) -> None:
        """End this consumer's blocked read now: :func:`wake_readers` for one consumer."""
        await wake_readers(self.writer, [self])

    async def run(self) -> None:
        """Read and handle until :meth:`stop`; survive connection drops with backoff."""
        await self._retrying(lambda: ensure_group(self.writer, self.spec.stream, self.spec.group))
        reclaimer = asyncio.create_task(self._reclaim_loop(), name=f"reclaim:{self.spec.stream}")
        try:
            own_pending = True  # first deliver what this consumer name left pending before a restart
            failures = 0
            while not self._stop.is_set():
                try:
                    if not self._reclaimed.empty():
                        await self._process(self._reclaimed.get_nowait())
                        continue
                    entries = await self._read("0" if own_pending else ">")
                    if own_pending and not entries:
                        own_pending = False
                        continue
                    if entries:
                        await self._process(entries)
                    failures = 0
                except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                    failures += 1
                    delay = min(2.0, 0.05 * 2**failures) * (0.5 + random.random())
                    log.warning("%s: connection problem (%s); retrying in %.2fs", self.spec.actor, e, delay)
                    await self._sleep(delay)
                except ResponseError as e:
                    if "NOGROUP" in str(e):
                        await ensure_group(self.writer, self.spec.stream, self.spec.group)
                    else:
                        raise
        finally:
            reclaimer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reclaimer

    async def _read(self, start: str) -> list[Entry]:
        block = None if start == "0" else self._block_ms
        reply: Any = await self.reader.xreadgroup(
            self.spec.group, self.spec.consumer, {self.spec.stream: start}, count=self._batch, block=block
        )
        entries: list[Entry] = []
        for _stream, items in reply or []:
            for entry_id, fields in items:
                if fields is None:  # entry trimmed/deleted while pending: nothing to process
                    await self.writer.xack(self.spec.stream, self.spec.group, entry_id)
                    continue
                entries.append(Entry(self.spec.stream, as_text(entry_id), dict(fields)))
        return entries

    async def _process(self, entries: list[Entry]) -> None:
        if self._batch_handler is not None:
            try:
                results = list(await self._batch_handler(entries))
            except Exception:
                log.exception("%s: batch handler failed; %d entries stay pending", self.spec.actor, len(entries))
                return
        else:
            results = await asyncio.gather(*(self._handle_one(e) for e in entries))
        await self._commit(entries, results)

    async def _handle_one(self, entry: Entry) -> Effects | None:
        assert self._handler is not None
        try:
            return await self._handler(entry)
        except (DecodeError, ValidationError) as e:
            return self._dead(entry, str(e))
        except Exception as e:
            log.exception("%s: handler failed on %s %s", self.spec.actor, entry.stream, entry.id)
            return Effects(ack=False) if not isinstance(e, asyncio.CancelledError) else None

    def _dead(self, entry: Entry, reason: str) -> Effects:
        effects = Effects().dead_letter(self.names, entry, reason, self.spec.actor, self.settings.dead_maxlen)
        if self._on_dead is not None:
            try:
                self._on_dead(entry, reason, effects)
            except Exception:
                log.exception("%s: dead-letter hook failed for %s", self.spec.actor, entry.id)
        return effects

    async def _commit(self, entries: list[Entry], results: Sequence[Effects | None]) -> None:
        acks: list[str] = []
        ops = []
        for entry, effects in zip(entries, results, strict=True):
            if effects is not None:
                if not effects.ack:
                    continue
                ops.extend(effects.ops)
            acks.append(entry.id)
        if not acks and not ops:
            return

        async def execute() -> None:
            pipe = self.writer.pipeline(transaction=True)
            for op in ops:
                op(pipe)
            if acks:
                pipe.xack(self.spec.stream, self.spec.group, *acks)
            await pipe.execute()

        await self._retrying(execute)
        self.processed += len(acks)

    async def _reclaim_loop(self) -> None:
        cursor = "0-0"
        interval = self.settings.reclaim_interval_ms / 1000
        while not self._stop.is_set():
            await self._sleep(interval * (0.8 + 0.4 * random.random()))
            try:
                cursor = await self.reclaim_once(cursor)
                if self._trim_acked:
                    await trim_acknowledged(self.writer, self.spec.stream, self.settings.retain_acked_s)
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                log.debug("%s: reclaim skipped (%s)", self.spec.actor, e)
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    log.warning("%s: reclaim failed: %s", self.spec.actor, e)
            except Exception:  # the loop must outlive any surprise, or pending work would never be reclaimed
                log.exception("%s: reclaim round failed on %s", self.spec.actor, self.spec.stream)

    async def reclaim_once(self, cursor: str = "0-0") -> str:
        """Claim entries idle past the limit; dead-letter over-delivered ones, queue the rest. Returns the cursor."""
        reply: Any = await self.writer.xautoclaim(
            self.spec.stream, self.spec.group, self.spec.consumer,
            min_idle_time=self.settings.reclaim_idle_ms, start_id=cursor, count=self._batch,
        )
        next_cursor, claimed = as_text(reply[0]), reply[1]
        entries = [Entry(self.spec.stream, as_text(i), dict(f)) for i, f in claimed if f is not None]
        if not entries:
            return next_cursor
        counts = await self._delivery_counts([e.id for e in entries])
        retry: list[Entry] = []
        dead_entries: list[Entry] = []
        for entry in entries:
            if counts.get(entry.id, 1) > self.settings.max_deliveries:
                dead_entries.append(entry)
            else:
                retry.append(entry)
        if dead_entries:
            reason = f"delivered more than {self.settings.max_deliveries} times without success"
            await self._commit(dead_entries, [self._dead(e, reason) for e in dead_entries])
            log.warning("%s: dead-lettered %d over-delivered entries", self.spec.actor, len(dead_entries))
        if retry:
            log.info("%s: reclaimed %d entries from dead or slow consumers", self.spec.actor, len(retry))
            await self._reclaimed.put(retry)
        return next_cursor

    async def _delivery_counts(self, ids: list[str]) -> dict[str, int]:
        rows: Any = await self.writer.xpending_range(
            self.spec.stream, self.spec.group, min=min(ids, key=id_key), max=max(ids, key=id_key),
            count=len(ids) * 4 + 10, consumername=self.spec.consumer,
        )
        return {as_text(r["message_id"]): int(r["times_delivered"]) for r in rows}

    async def _retrying(self, fn: Callable[[], Awaitable[object]], attempts: int = 50) -> None:
        """Run a commit until it succeeds, retrying connection problems with backoff.

        A NOSCRIPT error means the server restarted between the pipeline loading its Lua scripts and
        running them (redis-py reconnects and replays the transaction without reloading them), so part
        of the batch may have run: the whole batch runs again (the next attempt reloads the scripts).
        Every effect tolerates that, as it tolerates a redelivery (replies and claims are deduplicated
        by id, acks and deletes are idempotent).
        """
        for attempt in range(attempts):
            try:
                await fn()
                return
            except (RedisConnectionError, RedisTimeoutError, OSError, NoScriptError) as e:
                delay = min(2.0, 0.05 * 2**attempt) * (0.5 + random.random())
                log.warning("%s: write failed (%s); retrying in %.2fs", self.spec.actor, e, delay)
                await asyncio.sleep(delay)
        await fn()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
