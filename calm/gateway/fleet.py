"""The gateway's cached view of what the knowledge base says is servable: model names and live workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from broker.kb import KnowledgeBase, ModelState

log = logging.getLogger(__name__)
REFRESH_S = 1.0


@dataclass(frozen=True, slots=True)
class FleetView:
    models: dict[str, ModelState] = field(default_factory=dict)
    alive_workers: tuple[str, ...] = ()
    at: float = 0.0  # monotonic time of the read; 0 when never read
    ok: bool = False  # the last read reached Redis


class FleetWatch:
    """Keeps a :class:`FleetView` fresh in the background; a negative answer is re-read before it is trusted."""

    def __init__(self, kb: KnowledgeBase, worker_timeout_s: float) -> None:
        self.kb = kb
        self.worker_timeout_s = worker_timeout_s
        self.view = FleetView()
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> FleetView:
        try:
            models = await self.kb.models()
            workers = await self.kb.workers()
        except (RedisError, OSError) as e:
            log.warning("knowledge base read failed: %s", e)
            self.view = FleetView(self.view.models, self.view.alive_workers, time.monotonic(), ok=False)
            return self.view
        now_ms = time.time() * 1000
        alive = tuple(w.id for w in workers.values() if w.alive(now_ms, self.worker_timeout_s))
        self.view = FleetView(models, alive, time.monotonic(), ok=True)
        return self.view

    async def has_model(self, name: str) -> bool:
        return name in self.view.models or name in (await self.refresh()).models

    async def has_workers(self) -> bool:
        return bool(self.view.alive_workers) or bool((await self.refresh()).alive_workers)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="gateway:fleet")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            await self.refresh()
