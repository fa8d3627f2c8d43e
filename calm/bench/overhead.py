"""``calm bench overhead``: what CALM's control plane costs, against the broker's own floor.

- the broker floor: one stream hop (XADD → XREADGROUP BLOCK in another task → XACK);
- route_ms at rising rates on the exact-cache path (every query still passes monitor, analyzer, planner
  and executor, but no model runs), until the system saturates;
- the most cache-hit queries per second the control plane answers (a burst that saturates it).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from broker.config import Settings
from broker.connection import client as make_client
from broker.ingress import entry_ms
from broker.names import Names
from broker.retention import as_text
from calm.bench.live import drop_keys
from calm.client import ReplyCollector
from calm.report import machine_info, percentile
from calm.system import SystemSpec, running_system

PROBE = "12+7="


@dataclass(frozen=True, slots=True)
class OverheadOptions:
    rates: tuple[float, ...] = (50.0, 100.0, 200.0, 400.0, 800.0)
    seconds_per_rate: float = 4.0
    extra_sets: tuple[str, ...] = ()  # --set overrides passed on to every process of the system
    burst: int = 3000
    hops: int = 2000
    workers: int = 1


async def broker_hop(client: aioredis.Redis, names: Names, samples: int) -> dict[str, float | None]:
    """Latency of one hop with acknowledgement, the floor under every stage of the pipeline.

    Closed loop: each entry is sent only once the previous one was read and acknowledged by a consumer
    already blocked in XREADGROUP, so the figure is the hop itself, never a queue behind it.
    """
    stream = f"{names.prefix}bench:hop"
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    reader = aioredis.Redis(connection_pool=client.connection_pool)
    hops: list[float] = []
    acked = asyncio.Event()

    async def consume() -> None:
        while len(hops) < samples:
            rows: Any = await reader.xreadgroup("g", "c", {stream: ">"}, count=1, block=1000)
            for _, items in rows or []:
                for entry_id, fields in items:
                    await reader.xack(stream, "g", entry_id)
                    hops.append((time.perf_counter() - float(fields[b"t"])) * 1000)
                    acked.set()

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)  # let the consumer block first
    for _ in range(samples):
        acked.clear()
        await client.xadd(stream, {"t": repr(time.perf_counter())})
        await asyncio.wait_for(acked.wait(), 10)
    await asyncio.wait_for(task, 60)
    await client.delete(stream)
    return {"p50": percentile(hops, 50), "p99": percentile(hops, 99)}


async def at_rate(client: aioredis.Redis, names: Names, rate: float, seconds: float) -> dict[str, Any]:
    """Open-loop cache-hit queries at ``rate`` for ``seconds``: route_ms and the throughput achieved."""
    collector = ReplyCollector(client, names, f"overhead-{int(rate)}")
    n = max(1, int(rate * seconds))
    ids = [f"ovh-{int(rate)}-{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    started = time.monotonic()
    for i, qid in enumerate(ids):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await collector.send(PROBE, qid, max_new_tokens=4)
    replies = await collector.wait_for(ids, timeout_s=60)
    elapsed = max(time.monotonic() - started, 1e-9)
    await collector.close()
    route = [float(r["route_ms"]) for r in replies.values() if r.get("status") == "ok"]
    return {"rate_qps": rate, "sent": n, "answered": len(replies), "achieved_qps": round(len(replies) / elapsed, 1),
            "cached": sum(1 for r in replies.values() if r.get("cached") == "1"),
            "route_ms_p50": percentile(route, 50), "route_ms_p99": percentile(route, 99)}


async def burst(client: aioredis.Redis, names: Names, n: int) -> dict[str, Any]:
    """``n`` cache-hit queries at once (pipelined).

    ``qps``: replies per second from the first send to the last reply (the client's packing and the first
    query's route included). ``saturated_qps``: the executor's reply rate while the burst keeps the control
    plane saturated (see ``saturated_rate``).
    """
    collector = ReplyCollector(client, names, "overhead-burst")
    ids = [f"burst-{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    started = time.monotonic()
    pipe = client.pipeline(transaction=False)
    for qid in ids:
        pipe.xadd(names.queries, {"prompt": PROBE, "id": qid, "reply_to": collector.reply_to, "max_new_tokens": "4"})
    entry_ids = await pipe.execute()
    replies = await collector.wait_for(ids, timeout_s=120)
    elapsed = time.monotonic() - started
    await collector.close()
    arrived = {qid: entry_ms(as_text(e)) for qid, e in zip(ids, entry_ids, strict=True)}
    return {"queries": n, "answered": len(replies), "seconds": round(elapsed, 3),
            "qps": round(len(replies) / elapsed, 1), "saturated_qps": saturated_rate(arrived, replies)}


def saturated_rate(arrived_ms: dict[str, float], replies: dict[str, dict[str, str]]) -> float | None:
    """Replies per second between the first and the last reply of a burst, from the replies' own times.

    A reply was sent at its query's arrival (the entry id's server time) plus its ``latency_ms``. Over
    the span from the first reply to the last, ``len - 1`` replies were sent, so the rate counts neither
    the client's sending nor the first query's way through the stages. None with fewer than two
    answered replies or a zero span.
    """
    done = sorted(arrived_ms[qid] + float(r.get("latency_ms") or 0.0) for qid, r in replies.items()
                  if qid in arrived_ms and r.get("status") == "ok")
    if len(done) < 2 or done[-1] <= done[0]:
        return None
    return round((len(done) - 1) / ((done[-1] - done[0]) / 1000.0), 1)


async def run_overhead(settings: Settings, url: str, fleet_dir: Path, options: OverheadOptions) -> dict[str, Any]:
    prefix = f"{settings.redis.prefix}overhead-{uuid.uuid4().hex[:6]}:"
    names = Names(prefix)
    run_settings = settings.replace({"redis.prefix": prefix})
    client = make_client(url, run_settings.redis)
    try:
        hop = await broker_hop(client, names, options.hops)
        sets = ("--set=log.level=WARNING", "--set=planner.max_queue_per_model=100000",
                *(f"--set={s}" for s in options.extra_sets))
        system = SystemSpec(workers=options.workers, passthrough=sets)
        async with running_system(run_settings, url, fleet_dir, system):
            collector = ReplyCollector(client, names, "overhead-warm")
            await collector.wait_for([await collector.send(PROBE, max_new_tokens=4)], 60)  # fills the exact cache
            await collector.close()
            rates = []
            for rate in options.rates:
                result = await at_rate(client, names, rate, options.seconds_per_rate)
                rates.append(result)
                if result["achieved_qps"] < 0.9 * rate:
                    break  # saturated
            hits = await burst(client, names, options.burst)
    finally:
        await drop_keys(client, prefix)
        await client.aclose()
    at200 = next((r for r in rates if r["rate_qps"] == 200.0), None)
    return {
        "overhead": {
            "route_ms_p50_at_200qps": at200["route_ms_p50"] if at200 else None,
            "route_ms_p99_at_200qps": at200["route_ms_p99"] if at200 else None,
            "cache_hit_qps_max": hits["saturated_qps"] or hits["qps"],
            "broker_hop_ms_p50": hop["p50"],
            "broker_hop_ms_p99": hop["p99"],
        },
        "rates": rates,
        "burst": hits,
        "machine": machine_info(),
    }
