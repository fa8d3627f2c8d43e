"""``calm bench residency --live``: one arrival trace on the live system, once per scheduler policy.

Each policy gets a freshly started system (one worker holding what the capacity allows, caches off so
every request reaches a model) and the same trace, every request pinned to the model the trace names
(a domain resolves to its specialist, as in the simulator). Cold loads are counted from what the run
recorded: planner decisions whose model was not loaded when chosen, and the worker's load and evict events.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.config import Settings
from broker.connection import client as make_client
from broker.names import Names
from calm.bench.events import cold_load_counts, decisions, worker_events
from calm.bench.live import NO_CACHE, drop_keys
from calm.bench.traces import Request
from calm.loadgen import Run, replay
from calm.system import SystemSpec, running_system
from calm.workload import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS, Item, read_eval_sets
from workers.fleet.spec import Fleet, load_fleet

LIVE_POLICIES = ("lru", "demand60", "static", "forecast")
DEFAULT_POLICIES = "lru,demand60,static,forecast,belady"  # the simulated default; live runs then take lru,forecast


@dataclass(frozen=True, slots=True)
class LiveOptions:
    """How each policy's run is set up."""

    policies: tuple[str, ...] = ("lru", "forecast")
    memory_mb: int = 0  # the worker's budget
    timeout_s: float = 180.0  # longest wait for the last replies once the trace is sent
    progress: bool = True
    extra_sets: tuple[str, ...] = ()  # --set flags every process of every run gets
    child_log_level: str = "WARNING"


def slots_budget_mb(fleet: Fleet, slots: int) -> int:
    """A memory budget that holds ``slots`` models, never ``slots + 1``, as the worker and the scheduler size them.

    Both size a model as the larger of its card's estimate and its latest measured use, and measured
    use runs above the card (it is the worker process's growth while loading, which concurrent
    inference inflates: 5 MB cards measure up to ~8 MB). A budget of ``slots`` × the largest card
    would then hold fewer than ``slots`` and make two models evict each other in turn. So the budget
    is the most whole MB that still cannot hold ``slots + 1`` models by their cards (the smallest
    ones): what is left above ``slots`` × the largest card is headroom for measurements over the
    cards. With every model fitting (``slots`` at least the fleet's size), ``slots`` × the largest card.
    """
    sizes = sorted(float(c.memory_mb) for c in fleet.models)
    if not sizes or sizes[0] <= 0:
        raise ValueError("fleet cards lack memory_mb; use --memory-mb")
    least = math.ceil(slots * sizes[-1])
    if slots >= len(sizes):
        return least
    return max(least, math.ceil(sum(sizes[: slots + 1])) - 1)


def trace_items(trace: Sequence[Request], fleet: Fleet) -> tuple[list[Item], list[str]]:
    """One query per trace request (times from the first), a held-out prompt of the model's domain, and its pin.

    A model serving several domains (the generalist) takes them in turn.
    """
    eval_sets = read_eval_sets(dict(fleet.eval_sets))
    cards = {c.name: c for c in fleet.models}
    turn: dict[str, int] = {}
    cursor: dict[str, int] = {}
    items: list[Item] = []
    start = trace[0].t if trace else 0.0
    for request in trace:
        card = cards[request.model]
        domains = [d for d in card.domains if eval_sets.get(d)] or [d for d, rows in eval_sets.items() if rows]
        if not domains:
            raise ValueError(f"the fleet has no eval set to draw prompts for {request.model} from")
        domain = domains[turn.get(request.model, 0) % len(domains)]
        turn[request.model] = turn.get(request.model, 0) + 1
        rows = eval_sets[domain]
        row = rows[cursor.get(domain, 0) % len(rows)]
        cursor[domain] = cursor.get(domain, 0) + 1
        items.append(Item(round(request.t - start, 4), domain, row["prompt"], row["reference"],
                          MAX_NEW_TOKENS.get(domain, DEFAULT_MAX_NEW_TOKENS)))
    return items, [r.model for r in trace]


async def run_policy(settings: Settings, url: str, fleet_dir: Path, items: list[Item], pins: list[str], policy: str,
                     options: LiveOptions) -> tuple[Run, dict[str, Any]]:
    """A fresh system under ``policy``: replay the pinned items, then read back what it recorded."""
    prefix = f"{settings.redis.prefix}residency-{policy}-{uuid.uuid4().hex[:6]}:"
    names = Names(prefix)
    client = make_client(url, settings.redis)
    sets = (f"scheduler.policy={policy}", *NO_CACHE, *options.extra_sets, f"log.level={options.child_log_level}")
    system = SystemSpec(workers=1, memory_mb=options.memory_mb, passthrough=tuple(f"--set={s}" for s in sets))
    try:
        async with running_system(settings.replace({"redis.prefix": prefix}), url, fleet_dir, system):
            run = await replay(client, names, items, policy, pins=pins, timeout_s=options.timeout_s,
                               progress=options.progress)
            await asyncio.sleep(0.5)  # the last load/evict events of the run
            run.events = await worker_events(client, names)
            chosen = await decisions(client, names, run.ids)
    finally:
        await drop_keys(client, prefix)
        await client.aclose()
    counts = cold_load_counts(run.events, chosen, run.started_ms, run.ended_ms)
    counts["window_ms"] = [run.started_ms, run.ended_ms]  # the replay: first arrival sent to last reply read
    counts["requests"] = len(items)
    counts["replied"] = len(run.replies)
    counts["errors"] = sum(1 for r in run.replies.values() if r.get("status") != "ok")
    return run, {**counts, "decided": chosen}


async def run_live(settings: Settings, url: str, fleet_dir: Path, trace: Sequence[Request], options: LiveOptions
                   ) -> tuple[list[Run], dict[str, Any]]:
    """Every policy of ``options`` on the same trace, one fresh system after another."""
    unknown = sorted(set(options.policies) - set(LIVE_POLICIES))
    if unknown:
        raise ValueError(f"live runs take {', '.join(LIVE_POLICIES)}; got {', '.join(unknown)}")
    fleet = load_fleet(fleet_dir)
    items, pins = trace_items(trace, fleet)
    runs: list[Run] = []
    results: dict[str, Any] = {}
    for policy in options.policies:
        run, counts = await run_policy(settings, url, fleet_dir, items, pins, policy, options)
        runs.append(run)
        results[policy] = counts
    return runs, {"policies": results}


def write_live_report(out: Path, report: dict[str, Any], runs: Sequence[Run], pins: Sequence[str]) -> list[Path]:
    """report.json, replies.jsonl, events.jsonl (worker events and decisions per policy) and residency timelines
    (the arrivals under them by the model each was pinned to)."""
    from calm.plots import available, residency_timeline
    from calm.report import write_records, write_report_json

    write_records(out, runs)
    with (out / "events.jsonl").open("w", encoding="utf-8") as fh:
        for run in runs:
            for event in run.events:
                fh.write(json.dumps({"policy": run.strategy, "kind": "worker_event", **event}) + "\n")
            for decision in report["live"]["policies"][run.strategy].pop("decided"):
                fh.write(json.dumps({"policy": run.strategy, "kind": "decision", **decision}) + "\n")
    plots: list[Path] = []
    if available():
        for run in runs:
            arrivals = [(item.t, model) for item, model in zip(run.items, pins, strict=True)]
            plots.append(residency_timeline(out / f"residency-{run.strategy}.png", run.events, arrivals,
                                            run.started_ms, run.ended_ms, f"Residency under {run.strategy}",
                                            mix="model"))
    report["plots"] = [p.name for p in plots]
    write_report_json(out, report)
    return plots


def cmd_live_residency(args: argparse.Namespace, settings: Settings) -> int:
    """``calm bench residency --live``: run, write the report directory, print its figures and its path."""
    import time

    from broker.connection import resolve
    from calm import logs
    from calm.bench.residency import capacity, load_trace, scheduler_summary, trace_summary
    from calm.bench.simulator import compare
    from calm.cli import EXIT_OK, UsageError
    from calm.fleets import fleet_dir

    default = args.policies == DEFAULT_POLICIES
    policies = ("lru", "forecast") if default else tuple(p.strip() for p in args.policies.split(",") if p.strip())
    if "belady" in policies:
        raise UsageError("belady needs the future: it runs only in simulation (drop --live)")
    logs.setup("calm-bench", args.log_level or "WARNING", settings.log.json)
    fleet_path = fleet_dir(settings, profile="tiny")
    fleet = load_fleet(fleet_path)
    cards = list(fleet.models)
    trace = load_trace(args, cards)
    budget_mb = int(args.memory_mb) if args.memory_mb is not None else slots_budget_mb(fleet, args.slots)
    budget, memory, unit = capacity(args, trace, cards)
    options = LiveOptions(policies=policies, memory_mb=budget_mb, timeout_s=args.timeout_s,
                          extra_sets=tuple(args.set))
    resolved = resolve(settings.redis)
    try:
        runs, live = asyncio.run(run_live(settings, resolved.url, fleet_path, trace, options))
    finally:
        resolved.close()
    report: dict[str, Any] = {
        "live": live,
        "simulated": {"policies": compare(trace, budget, memory, settings.scheduler, args.load_s, policies)},
        "trace": trace_summary(args, trace),
        "capacity": {"budget": budget, "unit": unit, "worker_memory_mb": budget_mb, "memory": memory},
        "scheduler": scheduler_summary(settings),
        "fleet": str(fleet.root),
    }
    out = Path(args.report_dir) if args.report_dir else \
        Path(settings.paths.reports) / f"residency-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    write_live_report(out, report, runs, [r.model for r in trace])
    if args.json:
        print(json.dumps({k: report[k] for k in ("live", "simulated", "trace", "capacity", "plots")}, indent=2))
    else:
        for policy, row in report["live"]["policies"].items():
            sim = report["simulated"]["policies"][policy]
            print(f"{policy:>9}: live cold_loads {row['cold_loads']}/{row['decisions']} ({row['cold_load_rate']:.3f}), "
                  f"loads {row['loads']}, evictions {row['evictions']}, errors {row['errors']}; "
                  f"simulated cold_loads {sim['cold_loads']} ({sim['cold_load_rate']:.3f})")
    print(out)
    return EXIT_OK
