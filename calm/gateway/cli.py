"""``calm gateway``: serve the OpenAI-compatible API, ``/metrics`` and the dashboard."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from broker.config import DEFAULT_REDIS_URL
from broker.connection import answers
from broker.errors import BrokerError
from broker.eventloop import run

EXIT_OK = 0


def register(subparsers: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    parser = subparsers.add_parser("gateway", help="serve the OpenAI-compatible HTTP API, /metrics and the dashboard")
    add_common(parser)
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1; gateway.host)")
    parser.add_argument("--port", type=int, help="port (default 8080, 0 picks a free one; gateway.port)")
    parser.add_argument("--timeout", type=float, help="seconds to wait for a reply before 504 (gateway.timeout_s)")
    parser.add_argument("--max-inflight", type=int, help="queries waiting at once before 429 (gateway.max_inflight)")


def cmd_gateway(args: argparse.Namespace) -> int:
    from calm import logs
    from calm.cli import settings_from
    from calm.gateway.app import serve

    extra = {"gateway.host": args.host, "gateway.port": args.port, "gateway.timeout_s": args.timeout,
             "gateway.max_inflight": args.max_inflight}
    settings = settings_from(args, {k: v for k, v in extra.items() if v is not None})
    logs.setup("gateway", settings.log.level, settings.log.json)
    url = settings.redis.url or DEFAULT_REDIS_URL
    if not answers(url, settings.redis.connect_timeout_s):
        raise BrokerError("no Redis server answers at the configured URL (set CALM_REDIS_URL, or start 'calm up')")

    def ready(listening: str) -> None:
        print(f"CALM gateway listening on {listening} (OpenAI API at {listening}/v1, dashboard at {listening}/)",
              flush=True)

    return run(serve(settings, url, on_ready=ready), settings.runtime)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"gateway": cmd_gateway}
