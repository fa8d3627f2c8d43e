"""``calm demo``: the fleet under CALM against one baseline model, live, on the same workload."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from broker.codec import decode
from broker.config import Settings
from broker.connection import client as make_client
from broker.errors import DecodeError
from broker.messages import WorkerEvent
from broker.names import Names
from calm.loadgen import Run, replay
from calm.plots import write_plots
from calm.report import comparison, machine_info, print_table, strategy_report, write_records, write_report
from calm.system import SystemSpec, running_system
from calm.workload import Item, queries_for, read_eval_sets, shifting_mix
from workers.fleet.spec import Fleet, load_fleet


@dataclass(frozen=True, slots=True)
class DemoOptions:
    queries: str | int = "small"
    rate_qps: float = 3.0
    seed: int = 7
    workers: int = 1
    timeout_s: float = 180.0
    out: Path | None = None
    progress: bool = True
    child_log_level: str = "WARNING"


async def cold_loads(client: aioredis.Redis, names: Names) -> list[tuple[float, str]]:
    """(ms, model) of every model load workers reported on the scheduler stream."""
    rows: Any = await client.xrange(names.sched, count=100_000)
    loads = []
    for entry_id, fields in rows:
        try:
            message = decode(fields)
        except DecodeError:
            continue
        if isinstance(message, WorkerEvent) and message.event == "loaded" and message.detail != "already loaded":
            loads.append((float(entry_id.decode().split("-")[0]), message.model))
    return loads


async def warm_up(client: aioredis.Redis, names: Names, fleet: Fleet, items: list[Item]) -> None:
    """One query per domain and model, so every model has run once (and QoS has first samples)."""
    by_domain: dict[str, Item] = {}
    for item in items:
        by_domain.setdefault(item.domain, item)
    warm = [Item(0.0, i.domain, i.prompt, i.reference, i.max_new_tokens) for i in by_domain.values()]
    await replay(client, names, warm, "warmup", timeout_s=60, progress=False)
    for card in fleet.models:
        await replay(client, names, warm[:1], "warmup", pin=card.name, timeout_s=60, progress=False)


async def run_demo(settings: Settings, url: str, fleet_dir: Path, options: DemoOptions) -> tuple[Path, dict[str, Any]]:
    """Start the system, replay the workload with CALM choosing and pinned to the baseline, and report."""
    fleet = load_fleet(fleet_dir)
    baseline = fleet.baseline()
    if baseline is None:
        raise ValueError(f"fleet {fleet_dir} has no baseline model (a card with baseline = true)")
    eval_sets = read_eval_sets(dict(fleet.eval_sets))
    items = shifting_mix(eval_sets, queries_for(options.queries), options.rate_qps, options.seed)
    run_settings = settings.replace({"redis.prefix": f"{settings.redis.prefix}demo-{uuid.uuid4().hex[:8]}:"})
    names = Names(run_settings.redis.prefix)
    client = make_client(url, run_settings.redis)
    runs: dict[str, Run] = {}
    try:
        async with running_system(run_settings, url, fleet_dir, SystemSpec(
            workers=options.workers, passthrough=(f"--set=log.level={options.child_log_level}",))):
            await warm_up(client, names, fleet, items)
            runs["calm"] = await replay(client, names, items, "calm", timeout_s=options.timeout_s,
                                        progress=options.progress)
            await asyncio.sleep(1.0)  # let stragglers of the first pass finish
            runs["single"] = await replay(client, names, items, "single", pin=baseline.name,
                                          timeout_s=options.timeout_s, progress=options.progress)
            loads = await cold_loads(client, names)
    finally:
        await _drop_keys(client, names.prefix)
        await client.aclose()
    strategies = {name: strategy_report(run, loads) for name, run in runs.items()}
    report: dict[str, Any] = {
        "title": f"CALM vs single-model baseline ({baseline.name}) on fleet {fleet.name}",
        "strategies": strategies,
        "comparison": comparison(strategies),
        "machine": machine_info(),
        "fleet": {"root": str(fleet.root), "name": fleet.name, "profile": fleet.profile,
                  "recipe_hash": fleet.recipe_hash, "baseline": baseline.name,
                  "models": {m.name: {"params": m.params, "domains": list(m.domains), "quality": dict(m.quality)}
                             for m in fleet.models}},
        "workload": {"queries": len(items), "rate_qps": options.rate_qps, "seed": options.seed,
                     "domains": sorted({i.domain for i in items}), "workers": options.workers},
    }
    out = options.out or Path(settings.paths.reports) / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    write_records(out, runs.values())
    report["plots"] = [p.name for p in write_plots(out, report, runs.values())]
    return write_report(out, report), report


async def _drop_keys(client: aioredis.Redis, prefix: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
    for i in range(0, len(keys), 500):
        await client.delete(*keys[i:i + 500])


def show(report: dict[str, Any]) -> None:
    print_table(report)
