"""Gateway benchmarks, measured side by side (figures for the notes, not assertions).

    python -m tests.bench_gateway overhead [--queries 300]
        HTTP through the gateway vs a direct stream client (``calm.client.ReplyCollector``), both
        against the stub pipeline, interleaved; prints p50/p95 of each and the gateway's added time.
    python -m tests.bench_gateway scale --fleet DIR [--queries 48]
        The same model-bound burst through the gateway with 1 then 2 workers (``calm up`` processes);
        prints the throughput of each and their ratio.

Uses CALM_REDIS_URL or the local server, under a fresh key prefix that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import time
import uuid
from pathlib import Path

import aiohttp
import redis
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from broker.config import DEFAULT_REDIS_URL, GatewaySettings, RedisSettings, Settings
from broker.names import Names
from calm.client import ReplyCollector
from calm.gateway.app import build_app
from tests.gatewaystub import running_stub
from tests.test_scale_out import fleet_of, gateway, pinned_burst, specialist, wait_replicas


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def overhead(url: str, prefix: str, queries: int) -> None:
    settings = Settings(redis=RedisSettings(url=url, prefix=prefix, embedded=False),
                        gateway=GatewaySettings(timeout_s=30.0))
    client = aioredis.Redis.from_url(url)
    async with running_stub(client, settings):
        server = TestServer(build_app(settings, url), host="127.0.0.1")
        await server.start_server()
        base = str(server.make_url("")).rstrip("/")
        direct = ReplyCollector(client, Names(prefix), "bench")
        via_http: list[float] = []
        via_stream: list[float] = []
        async with aiohttp.ClientSession() as http:
            for i in range(queries + 20):
                prompt = f"{i}+{i}="
                start = time.perf_counter()
                async with http.post(f"{base}/v1/completions", json={"model": "calm", "prompt": prompt}) as r:
                    assert r.status == 200, await r.text()
                    await r.read()
                http_ms = (time.perf_counter() - start) * 1000
                start = time.perf_counter()
                qid = await direct.send(prompt)
                assert qid in await direct.wait_for([qid], 30)
                stream_ms = (time.perf_counter() - start) * 1000
                if i >= 20:  # warm-up excluded
                    via_http.append(http_ms)
                    via_stream.append(stream_ms)
        await direct.close()
        await server.close()
    await client.aclose()
    print(f"overhead over {queries} sequential queries against the stub pipeline:")
    print(f"  direct stream client  p50 {_pct(via_stream, .5):6.2f} ms  p95 {_pct(via_stream, .95):6.2f} ms")
    print(f"  through the gateway   p50 {_pct(via_http, .5):6.2f} ms  p95 {_pct(via_http, .95):6.2f} ms")
    added = [h - s for h, s in zip(via_http, via_stream, strict=True)]
    print(f"  gateway adds          p50 {statistics.median(added):6.2f} ms per request")


async def scale(url: str, prefix: str, fleet: Path, queries: int) -> None:
    model = specialist(fleet)
    settings = Settings(redis=RedisSettings(url=url, prefix=prefix, embedded=False))
    rates: dict[int, float] = {}
    for workers in (1, 2):
        run_prefix = f"{prefix}{workers}w:"
        run_settings = dataclasses.replace(settings, redis=RedisSettings(url=url, prefix=run_prefix, embedded=False))
        with fleet_of(workers, fleet, url, run_prefix, model):
            async with gateway(run_settings, url) as base, aiohttp.ClientSession() as http:
                await wait_replicas(http, base, model, workers)
                await pinned_burst(http, base, model, 4)  # warm-up
                start = time.perf_counter()
                replies = await pinned_burst(http, base, model, queries)
                wall = time.perf_counter() - start
        served = sorted({r["worker"] for r in replies})
        rates[workers] = queries / wall
        print(f"  {workers} worker(s): {queries} queries pinned to {model} in {wall:.2f} s = "
              f"{rates[workers]:.2f} q/s, served by {', '.join(served)}")
        _cleanup(url, run_prefix)
    print(f"  throughput 2 workers / 1 worker = {rates[2] / rates[1]:.2f}x")


def _cleanup(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i:i + 500])
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["overhead", "scale"])
    parser.add_argument("--queries", type=int)
    parser.add_argument("--fleet", type=Path, default=os.environ.get("CALM_FLEET"))
    args = parser.parse_args()
    url = os.environ.get("CALM_REDIS_URL") or DEFAULT_REDIS_URL
    prefix = f"calmbench-{uuid.uuid4().hex[:8]}:"
    try:
        if args.which == "overhead":
            asyncio.run(overhead(url, prefix, args.queries or 300))
        else:
            if args.fleet is None:
                parser.error("scale needs --fleet DIR (or CALM_FLEET)")
            asyncio.run(scale(url, prefix, args.fleet, args.queries or 48))
    finally:
        _cleanup(url, prefix)


if __name__ == "__main__":
    main()
