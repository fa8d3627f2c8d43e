"""Container healthchecks: is the CALM process in this container alive, by its own heartbeat in the KB?

``python -m calm.gateway.probe actor ROLE`` and ``... probe worker`` look for a live heartbeat of an
instance named after this host (instances are ``<hostname>-<pid>``); ``... probe http URL`` wants a 200.
Exit code 0 when healthy, 1 otherwise, with the reason on stderr.
"""

from __future__ import annotations

import socket
import sys
import urllib.request
from collections.abc import Sequence

import redis

from broker.config import DEFAULT_REDIS_URL, load_settings
from broker.connection import sync_client
from broker.names import Names


def actor_alive(client: redis.Redis, names: Names, role: str, host: str) -> bool:
    members = [m.decode() for m in client.smembers(names.actors)]  # type: ignore[union-attr]
    mine = [m.partition(":")[2] for m in members if m.startswith(f"{role}:{host}-")]
    return any(client.exists(names.actor(role, instance)) for instance in mine)


def worker_alive(client: redis.Redis, names: Names, host: str) -> bool:
    ids = [w.decode() for w in client.smembers(names.workers)]  # type: ignore[union-attr]
    return any(client.exists(names.worker_alive(w)) for w in ids if w.startswith(f"{host}-"))


def http_ok(url: str, timeout_s: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("actor", "worker", "http") or (args[0] != "worker" and len(args) != 2):
        print("usage: python -m calm.gateway.probe actor ROLE | worker | http URL", file=sys.stderr)
        return 2
    if args[0] == "http":
        healthy = http_ok(args[1])
    else:
        settings = load_settings()
        client = sync_client(settings.redis.url or DEFAULT_REDIS_URL, settings.redis)
        names = Names(settings.redis.prefix)
        host = socket.gethostname()
        try:
            healthy = actor_alive(client, names, args[1], host) if args[0] == "actor" else worker_alive(
                client, names, host)
        except redis.RedisError as e:
            print(f"probe: {e}", file=sys.stderr)
            return 1
        finally:
            client.close()
    if not healthy:
        print(f"probe: no live {' '.join(args)} heartbeat for this container", file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
