"""The process event loop follows ``runtime.event_loop``."""

from __future__ import annotations

import asyncio

import pytest

from broker.config import ConfigError, RuntimeSettings, load_settings
from broker.eventloop import loop_name, run


async def _loop_type() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_and_uvloop_run_on_uvloop_asyncio_on_its_own() -> None:
    pytest.importorskip("uvloop")
    assert run(_loop_type(), RuntimeSettings()).startswith("uvloop")
    assert run(_loop_type(), RuntimeSettings(event_loop="uvloop")).startswith("uvloop")
    assert run(_loop_type(), RuntimeSettings(event_loop="asyncio")).startswith("asyncio")
    assert loop_name(RuntimeSettings(event_loop="asyncio")) == "asyncio"


def test_the_setting_is_validated_and_read_from_the_environment() -> None:
    with pytest.raises(ConfigError, match=r"runtime\.event_loop"):
        RuntimeSettings(event_loop="trio")
    settings = load_settings(env={"CALM_RUNTIME_EVENT_LOOP": "asyncio"})
    assert settings.runtime.event_loop == "asyncio"
