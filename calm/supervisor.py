"""Supervisor: runs every actor and worker as a child process, restarts crashes, stops all cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from broker.runtime import READY_LINE, SUPERVISOR_PID_ENV

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
MAX_BACKOFF_S = 10.0
STABLE_AFTER_S = 30.0


@dataclass(slots=True)
class ChildSpec:
    """One supervised process: a name and the ``calm`` arguments that start it."""

    name: str
    args: list[str]


@dataclass(slots=True)
class Child:
    spec: ChildSpec
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    history: list[float] = field(default_factory=list)  # restart times


class Supervisor:
    """Spawns children with ``python -m calm ARGS``, waits for their ready line, restarts them when they die."""

    def __init__(self, specs: Sequence[ChildSpec], env: dict[str, str], max_restarts: int = 50) -> None:
        self.children = {s.name: Child(s) for s in specs}
        self.env = {**env, SUPERVISOR_PID_ENV: str(os.getpid())}  # children stop if we die unannounced
        self.max_restarts = max_restarts
        self.stopping = asyncio.Event()
        self._watchers: list[asyncio.Task[None]] = []
        self._readers: set[asyncio.Task[None]] = set()

    async def start(self, ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        """Start every child and wait until each has said it is ready."""
        for child in self.children.values():
            await self._spawn(child)
            self._watchers.append(asyncio.create_task(self._watch(child), name=f"watch:{child.spec.name}"))
        waits = [asyncio.create_task(c.ready.wait()) for c in self.children.values()]
        _, pending = await asyncio.wait(waits, timeout=ready_timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            late = [c.spec.name for c in self.children.values() if not c.ready.is_set()]
            raise TimeoutError(f"not ready after {ready_timeout_s:.0f}s: {', '.join(late)}")

    def pids(self) -> dict[str, int]:
        return {n: c.proc.pid for n, c in self.children.items() if c.proc is not None and c.proc.returncode is None}

    async def _spawn(self, child: Child) -> None:
        child.ready.clear()
        child.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "calm", *child.spec.args, stdout=asyncio.subprocess.PIPE, env=self.env,
            start_new_session=True,
        )
        child.started_at = time.monotonic()
        log.info("started %s (pid %d)", child.spec.name, child.proc.pid)
        self._readers.add(asyncio.create_task(self._read_stdout(child, child.proc)))
        self._readers = {t for t in self._readers if not t.done()}

    async def _read_stdout(self, child: Child, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line.startswith(READY_LINE):
                child.ready.set()
            elif line:
                print(f"[{child.spec.name}] {line}", flush=True)

    async def _watch(self, child: Child) -> None:
        backoff = 0.5
        while True:
            assert child.proc is not None
            code = await child.proc.wait()
            if self.stopping.is_set():
                return
            uptime = time.monotonic() - child.started_at
            if uptime > STABLE_AFTER_S:
                backoff = 0.5
            now = time.monotonic()
            child.history = [t for t in child.history if now - t < 300] + [now]
            if len(child.history) > self.max_restarts:
                log.error("%s crashed %d times in 5 minutes; giving up on it", child.spec.name, len(child.history))
                return
            log.warning("%s exited with %s after %.1fs; restarting in %.1fs", child.spec.name, code, uptime, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=backoff)
            if self.stopping.is_set():
                return
            backoff = min(MAX_BACKOFF_S, backoff * 2)
            child.restarts += 1
            await self._spawn(child)

    async def stop(self) -> None:
        """SIGTERM every child, wait for them, SIGKILL the ones that hang."""
        self.stopping.set()
        procs = [c.proc for c in self.children.values() if c.proc is not None and c.proc.returncode is None]
        # Actors first would strand workers' replies; stop everything at once and let each drain.
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        waits = [asyncio.create_task(p.wait()) for p in procs]
        if waits:
            _, late = await asyncio.wait(waits, timeout=STOP_TIMEOUT_S)
            for proc in procs:
                if proc.returncode is None:
                    log.warning("pid %d did not stop in %.0fs; killing it", proc.pid, STOP_TIMEOUT_S)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if late:
                await asyncio.wait(late, timeout=5)
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)


def child_env(
    base: dict[str, str], url: str, prefix: str, fleet: str, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment children get: the resolved server, prefix and fleet, so every child agrees."""
    env = dict(base)
    env.update({"CALM_REDIS_URL": url, "CALM_PREFIX": prefix, "CALM_FLEET": fleet, "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env

