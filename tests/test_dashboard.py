"""The live dashboard in headless Chromium, on the real system: it loads, and its numbers move as queries flow."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestServer

from broker.config import GatewaySettings, Settings
from calm.gateway.app import build_app
from tests.calmproc import calm_up
from tests.cdp import CHROMIUM, Page, chromium_page

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                     "(apt-get install -y chromium)"),
]
FAST = ("--set=streams.reclaim_idle_ms=1500", "--set=streams.reclaim_interval_ms=300",
        "--set=executor.attempt_timeout_s=30", "--set=scheduler.worker_timeout_s=4")


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 60.0) -> Any:
    """Poll ``check`` until it returns something truthy (a hang guard, not a speed check)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.25)


async def number(page: Page, element_id: str) -> float:
    text = await page.evaluate(f"document.getElementById({json.dumps(element_id)}).textContent")
    return float(str(text).replace(",", "").split("/")[0].strip() or "nan")


def prompts(fleet: Path, domain: str, n: int) -> list[str]:
    rows = [json.loads(line) for line in (fleet / "eval" / f"{domain}.jsonl").read_text().splitlines() if line]
    return [r["prompt"] for r in rows[:n]]


async def test_dashboard_shows_the_fleet_and_live_numbers(tiny_fleet: Path, redis_url: str, prefix: str,
                                                          settings: Settings, tmp_path: Path) -> None:
    settings = dataclasses.replace(settings, gateway=GatewaySettings(timeout_s=60.0))
    with calm_up(redis_url, prefix, tiny_fleet, "--workers", "1", *FAST):
        server = TestServer(build_app(settings, redis_url), host="127.0.0.1")
        await server.start_server()
        base = str(server.make_url("")).rstrip("/")
        try:
            async with chromium_page(tmp_path / "chromium") as page:
                await page.navigate(f"{base}/")
                assert await page.evaluate("document.title") == "CALM dashboard"
                await until(lambda: page.evaluate("document.body.dataset.updated"), "the first poll")
                await until(lambda: page.evaluate("document.querySelector('#workers tbody').textContent"
                                                  ".includes('-w1')"), "the worker in the fleet table")
                before = await number(page, "stat-inferences")
                first_poll = await page.evaluate("document.body.dataset.updated")
                # The gateway answers within its 60 s timeout; the client gives up later, so a lost request
                # fails this test instead of hanging it (the SDK waits 600 s by default).
                async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0,
                                              timeout=120.0) as client:
                    asks = [client.completions.create(model="calm", prompt=p, max_tokens=12)
                            for domain in ("arithmetic", "sorting") for p in prompts(tiny_fleet, domain, 6)]
                    done = await asyncio.gather(*asks)
                assert all(d.choices[0].finish_reason in ("stop", "length") for d in done)

                async def moved() -> bool:
                    return await number(page, "stat-inferences") >= before + len(asks)

                await until(moved, "the inference count to take in the new queries")
                assert await page.evaluate("document.body.dataset.updated") != first_poll
                decisions = await until(lambda: page.evaluate(
                    "document.querySelectorAll('#decisions .decision').length"), "decisions")
                assert decisions >= 1
                breakdown = await page.evaluate("document.querySelector('#decisions .decision table').innerText")
                assert "fit" in breakdown and "utility" in breakdown
                domains = await page.evaluate("document.getElementById('domains').innerText")
                assert "arithmetic" in domains and "sorting" in domains
                loaded = await page.evaluate("document.querySelector('#models tbody').innerText")
                assert "-w1" in loaded, "the models table says where models are loaded"
                path = await page.screenshot(tmp_path / "dashboard.png")
                assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
                assert page.errors == [], page.errors
                print(f"dashboard screenshot: {path}")
        finally:
            await server.close()
