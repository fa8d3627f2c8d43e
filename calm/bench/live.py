"""The live benchmark: one workload through several routing strategies, each on a freshly started system."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from broker.config import Settings
from broker.connection import client as make_client
from broker.names import Names
from calm.bench import cputime
from calm.bench.events import worker_events
from calm.loadgen import Run, replay
from calm.report import comparison, machine_info, strategy_report
from calm.roles import ROLES
from calm.system import SystemSpec, running_system
from calm.workload import Item
from workers.fleet.spec import Fleet, load_fleet

NO_CACHE = ("cache.exact=false", "cache.semantic=false")


@dataclass(frozen=True, slots=True)
class StrategySpec:
    """How a strategy runs: settings for every process, and whether queries are pinned to the baseline."""

    name: str
    sets: tuple[str, ...]
    pin_baseline: bool = False
    about: str = ""


STRATEGIES: dict[str, StrategySpec] = {
    s.name: s for s in (
        StrategySpec("single", ("planner.strategy=utility", *NO_CACHE), pin_baseline=True,
                     about="every query to the baseline model, no cache"),
        StrategySpec("random", ("planner.strategy=random", *NO_CACHE), about="a random specialist"),
        StrategySpec("round-robin", ("planner.strategy=round-robin", *NO_CACHE), about="specialists in turn"),
        StrategySpec("semantic", ("planner.strategy=semantic", "scheduler.policy=lru", *NO_CACHE),
                     about="the paper's prototype in practice: pure similarity + LRU"),
        StrategySpec("calm-nocache", ("planner.strategy=utility", "scheduler.policy=forecast", *NO_CACHE),
                     about="adaptive routing + forecasting scheduler, caches off"),
        StrategySpec("calm", ("planner.strategy=utility", "scheduler.policy=forecast"),
                     about="adaptive routing + forecasting scheduler + exact and semantic caches"),
    )
}


@dataclass(frozen=True, slots=True)
class BenchOptions:
    workers: int = 1
    timeout_s: float = 180.0
    progress: bool = True
    child_log_level: str = "WARNING"
    extra_sets: tuple[str, ...] = ()


def model_loads(events: list[dict[str, Any]]) -> list[tuple[float, str]]:
    """(ms, model) of every model load among the recorded worker events."""
    return [(e["at_ms"], e["model"]) for e in events if e["event"] == "loaded" and e["detail"] != "already loaded"]


async def warm_up(client: aioredis.Redis, names: Names, fleet: Fleet) -> None:
    """Each model's card examples, pinned and then routed: every model has run and QoS has first samples.

    Card examples are not in the held-out sets, so the warm-up seeds no cache entry the workload hits.
    """
    pinned: list[tuple[str, Item]] = []
    routed: list[Item] = []
    for card in fleet.models:
        for example in card.examples[:2]:
            pinned.append((card.name, Item(0.0, "", example, "", 8)))
        routed.extend(Item(0.0, "", example, "", 8) for example in card.examples[2:4])
    for model, item in pinned:
        await replay(client, names, [item], "warmup", pin=model, timeout_s=60, progress=False)
    await replay(client, names, routed, "warmup", timeout_s=60, progress=False)


async def run_strategy(settings: Settings, url: str, fleet_dir: Path, items: list[Item], spec: StrategySpec,
                       options: BenchOptions) -> tuple[Run, list[tuple[float, str]]]:
    """Start a fresh system configured for ``spec``, warm it up, replay ``items``, and stop it."""
    fleet = load_fleet(fleet_dir)
    baseline = fleet.baseline()
    if spec.pin_baseline and baseline is None:
        raise ValueError(f"strategy {spec.name} needs a baseline model in {fleet_dir}")
    prefix = f"{settings.redis.prefix}bench-{spec.name}-{uuid.uuid4().hex[:6]}:"
    run_settings = settings.replace({"redis.prefix": prefix})
    names = Names(prefix)
    client = make_client(url, run_settings.redis)
    sets = (*spec.sets, *options.extra_sets, f"log.level={options.child_log_level}")
    system = SystemSpec(workers=options.workers, passthrough=tuple(f"--set={s}" for s in sets))
    try:
        async with running_system(run_settings, url, fleet_dir, system) as supervisor:
            await warm_up(client, names, fleet)
            before = cputime.snapshot(supervisor.pids())
            run = await replay(client, names, items, spec.name, pin=baseline.name if spec.pin_baseline and baseline
                               else None, timeout_s=options.timeout_s, progress=options.progress)
            run.cpu_s = cputime.used_between(before, cputime.snapshot(supervisor.pids()))
            await asyncio.sleep(0.5)
            run.events = await worker_events(client, names)
            loads = model_loads(run.events)
    finally:
        await drop_keys(client, prefix)
        await client.aclose()
    return run, loads


async def run_bench(settings: Settings, url: str, fleet_dir: Path, items: list[Item], strategies: list[str],
                    options: BenchOptions) -> tuple[dict[str, Run], dict[str, Any]]:
    """Every strategy on the same workload, one after another; the report follows the contract."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; known: {sorted(STRATEGIES)}")
    fleet = load_fleet(fleet_dir)
    runs: dict[str, Run] = {}
    reports: dict[str, Any] = {}
    for name in strategies:
        run, loads = await run_strategy(settings, url, fleet_dir, items, STRATEGIES[name], options)
        runs[name] = run
        reports[name] = strategy_report(run, loads, ROLES, settings.worker.watts_per_core)
        reports[name]["about"] = STRATEGIES[name].about
    baseline = fleet.baseline()
    report: dict[str, Any] = {
        "strategies": reports,
        "comparison": comparison(reports, runs=runs),
        "machine": machine_info(),
        "fleet": {"root": str(fleet.root), "name": fleet.name, "profile": fleet.profile,
                  "recipe_hash": fleet.recipe_hash, "baseline": baseline.name if baseline else None,
                  "models": {m.name: {"params": m.params, "domains": list(m.domains), "quality": dict(m.quality)}
                             for m in fleet.models}},
        "workload": {"queries": len(items), "domains": sorted({i.domain for i in items}), "workers": options.workers,
                     "duration_s": items[-1].t if items else 0.0},
    }
    return runs, report


async def drop_keys(client: aioredis.Redis, prefix: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
    for i in range(0, len(keys), 500):
        await client.delete(*keys[i:i + 500])
