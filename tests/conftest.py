"""Shared fixtures: a real Redis (the machine's or an embedded Valkey), fresh key prefixes, the tiny fleet."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from broker.config import DEFAULT_REDIS_URL, RedisSettings, Settings, StreamSettings
from broker.connection import answers
from broker.embedded import EmbeddedValkey
from broker.names import Names


@pytest.fixture(scope="session", autouse=True)
def _private_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """onnxruntime writes under XDG_CACHE_HOME; keep that out of the user's home during tests."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def embedded_server() -> Iterator[EmbeddedValkey]:
    """A private embedded Valkey for this test session (always started, whatever else runs)."""
    with EmbeddedValkey() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(embedded_server: EmbeddedValkey) -> str:
    """CALM_REDIS_URL when it answers, else the default URL when it answers, else the embedded server."""
    for url in (os.environ.get("CALM_REDIS_URL"), DEFAULT_REDIS_URL):
        if url and answers(url):
            return url
    return embedded_server.url


@pytest.fixture
def prefix() -> Iterator[str]:
    """A fresh key prefix per test, deleted afterwards."""
    value = f"calmtest-{uuid.uuid4().hex[:10]}:"
    yield value


@pytest.fixture
def names(prefix: str) -> Names:
    return Names(prefix)


@pytest.fixture
def settings(redis_url: str, prefix: str, tmp_path: Path) -> Settings:
    return Settings(
        redis=RedisSettings(url=redis_url, prefix=prefix, embedded=False),
        streams=StreamSettings(block_ms=200, reclaim_idle_ms=500, reclaim_interval_ms=200, max_deliveries=3),
    )


@pytest.fixture
async def aclient(redis_url: str, prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()
    _cleanup(redis_url, prefix)


def _cleanup(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


@pytest.fixture(scope="session")
def tiny_fleet() -> Path:
    """The tiny profile's fleet (built once, then cached under CALM_CACHE_DIR or ~/.cache/calm).

    ``CALM_TEST_FLEET`` points the tests at an existing fleet directory instead.
    """
    if os.environ.get("CALM_TEST_FLEET"):
        return Path(os.environ["CALM_TEST_FLEET"])
    from workers.fleet import build_fleet

    cache = Path(os.environ.get("CALM_CACHE_DIR", Path.home() / ".cache" / "calm"))
    return Path(build_fleet("tiny", cache, progress=False))
