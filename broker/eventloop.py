"""Run a process's main coroutine on the configured event loop (uvloop when available)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from broker.config import ConfigError, RuntimeSettings

T = TypeVar("T")


def loop_name(settings: RuntimeSettings) -> str:
    """The loop ``settings`` selects on this machine: ``uvloop`` or ``asyncio``."""
    if settings.event_loop == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError as e:
        if settings.event_loop == "uvloop":
            raise ConfigError("runtime.event_loop=uvloop but uvloop is not installed") from e
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T], settings: RuntimeSettings) -> T:
    """``asyncio.run(main)`` on the loop ``settings`` selects."""
    if loop_name(settings) == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)
