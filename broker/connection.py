"""Connecting to Redis: the configured URL, else the default one, else an embedded Valkey."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import hiredis  # a dependency of CALM (redis[hiredis])
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.config import DEFAULT_REDIS_URL, RedisSettings
from broker.embedded import EmbeddedValkey
from broker.errors import ConnectionFailed

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ResolvedRedis:
    """Where the server is, and the embedded server we started (to stop on exit), if any."""

    url: str
    embedded: EmbeddedValkey | None = None

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None


def answers(url: str, timeout_s: float = 1.0) -> bool:
    """True when a server at ``url`` replies to PING."""
    return probe(url, timeout_s) is None


def probe(url: str, timeout_s: float = 1.0) -> str | None:
    """None when a server at ``url`` replies to PING, else why not (without the URL's secrets)."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            client.ping()
            return None
        finally:
            client.close()
    except redis.exceptions.AuthenticationError:
        return f"authentication failed at {redact(url)}"
    except redis.exceptions.ResponseError as e:
        if "NOAUTH" in str(e) or "WRONGPASS" in str(e) or "NOPERM" in str(e):
            return f"authentication failed at {redact(url)}"
        return f"the server at {redact(url)} refused: {e}"
    except (redis.exceptions.RedisError, OSError, ValueError):
        return f"no Redis server answers at {redact(url)}"


def resolve(settings: RedisSettings) -> ResolvedRedis:
    """Pick the server: ``settings.url`` if given (it must answer), else the default URL, else embedded."""
    if settings.url:
        problem = probe(settings.url, settings.connect_timeout_s)
        if problem:
            raise ConnectionFailed(problem)
        return ResolvedRedis(settings.url)
    if answers(DEFAULT_REDIS_URL, settings.connect_timeout_s):
        return ResolvedRedis(DEFAULT_REDIS_URL)
    if not settings.embedded:
        raise ConnectionFailed(f"no Redis server answers at {DEFAULT_REDIS_URL} and embedded servers are disabled")
    server = EmbeddedValkey().start()
    return ResolvedRedis(server.url, server)


class _HiredisPacking:
    """Commands packed by hiredis's C packer, as redis-py's blocking client does when hiredis is installed.

    redis-py's asyncio connections pack every argument in Python (~47 us for a 16-field XADD, ~8 us in C);
    an actor sends tens of commands per query, so this is a visible share of the control plane's CPU.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            packed: Any = tuple(bytes(a) if isinstance(a, bytearray | memoryview) else a for a in args)
            return [hiredis.pack_command(packed)]
        except TypeError as e:
            raise DataError(str(e)) from e


class _TcpConnection(_HiredisPacking, aioredis.Connection):
    pass


class _UnixConnection(_HiredisPacking, aioredis.UnixDomainSocketConnection):
    pass


class _TlsConnection(_HiredisPacking, aioredis.SSLConnection):
    pass


def _connection_class(url: str) -> type[aioredis.Connection] | type[aioredis.UnixDomainSocketConnection] | None:
    """The hiredis-packing connection class for `url`'s scheme (None: an unknown scheme, redis-py decides)."""
    scheme = url.partition("://")[0].lower()
    return {"redis": _TcpConnection, "rediss": _TlsConnection, "unix": _UnixConnection}.get(scheme)


def client(url: str, settings: RedisSettings, *, blocking: bool = False, name: str | None = None) -> aioredis.Redis:
    """An asyncio client with retry/backoff on connection errors. ``blocking`` clients have no read timeout.

    ``name`` is set on every connection it opens (``CLIENT SETNAME``), so it can be found in ``CLIENT LIST``.
    """
    retry = Retry(ExponentialWithJitterBackoff(cap=settings.retry_backoff_cap_s, base=0.05), settings.retry_attempts)
    connection_class = _connection_class(url)
    extra: dict[str, Any] = {"connection_class": connection_class} if connection_class is not None else {}
    return aioredis.Redis.from_url(
        url,
        **extra,
        socket_connect_timeout=settings.connect_timeout_s,
        socket_timeout=None if blocking else 10.0,
        socket_keepalive=True,
        health_check_interval=30,
        retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError],
        decode_responses=False,
        client_name=name,
    )


def sync_client(url: str, settings: RedisSettings) -> redis.Redis:
    """A blocking client for CLI commands and tests."""
    return redis.Redis.from_url(url, socket_connect_timeout=settings.connect_timeout_s, socket_timeout=10.0)


def redact(url: str) -> str:
    """``url`` without its password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
