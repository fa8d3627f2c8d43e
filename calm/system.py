"""The whole system as one unit: every actor plus N workers under a supervisor, ready when routable."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from broker.config import Settings
from calm.roles import ROLES
from calm.status import wait_routable
from calm.supervisor import ChildSpec, Supervisor, child_env


@dataclass(frozen=True, slots=True)
class SystemSpec:
    """How many workers, with what budget and device, and the flags every child inherits."""

    workers: int = 1
    memory_mb: int | None = None
    device: str | None = None
    passthrough: tuple[str, ...] = field(default_factory=tuple)


def child_specs(spec: SystemSpec) -> list[ChildSpec]:
    worker_args = []
    if spec.memory_mb:
        worker_args.append(f"--memory-mb={spec.memory_mb}")
    if spec.device:
        worker_args.append(f"--device={spec.device}")
    host = socket.gethostname()
    specs = [ChildSpec(role, ["actor", role, *spec.passthrough]) for role in ROLES]
    specs += [ChildSpec(f"worker-{i}", ["worker", f"--id={host}-w{i}", *worker_args, *spec.passthrough])
              for i in range(1, spec.workers + 1)]
    return specs


@asynccontextmanager
async def running_system(settings: Settings, url: str, fleet: Path, spec: SystemSpec) -> AsyncIterator[Supervisor]:
    """Start actors and workers, wait until every model is routable, and stop them all on exit."""
    env = child_env(dict(os.environ), url, settings.redis.prefix, str(fleet))
    supervisor = Supervisor(child_specs(spec), env)
    try:
        await supervisor.start()
        await wait_routable(settings, url, spec.workers)
        yield supervisor
    finally:
        await supervisor.stop()
