"""``calm bench`` (live strategies) and ``calm bench overhead``: command handlers."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from broker.eventloop import run
from calm import logs
from calm.cli import EXIT_OK, settings_from
from calm.workload import Item, bursty_mix, from_trace, queries_for, read_eval_sets, shifting_mix


def workload(args: argparse.Namespace, fleet_dir: Path) -> list[Item]:
    from workers.fleet.spec import load_fleet

    fleet = load_fleet(fleet_dir)
    eval_sets = read_eval_sets(dict(fleet.eval_sets))
    n = queries_for(args.queries)
    if args.workload == "steady":
        return shifting_mix(eval_sets, n, args.rate, args.seed, phases=1, dominant_share=1 / max(1, len(eval_sets)))
    if args.workload == "shift":
        return shifting_mix(eval_sets, n, args.rate, args.seed)
    if args.workload == "burst":
        return bursty_mix(eval_sets, n, args.rate, args.seed)
    domains = {m.name: m.domains[0] for m in fleet.models if m.domains}
    return from_trace(Path(args.workload), eval_sets, domains, limit=n)


def cmd_live(args: argparse.Namespace) -> int:
    from broker.connection import resolve
    from calm.bench.live import BenchOptions, run_bench
    from calm.fleets import fleet_dir
    from calm.report import print_table, write_all

    settings = settings_from(args)
    logs.setup("calm-bench", args.log_level or "WARNING", settings.log.json)
    resolved = resolve(settings.redis)
    try:
        fleet = fleet_dir(settings, profile=args.profile)
        items = workload(args, fleet)
        options = BenchOptions(workers=args.workers)
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        runs, report = asyncio.run(run_bench(settings, resolved.url, fleet, items, strategies, options))
    finally:
        resolved.close()
    report["title"] = f"calm bench: {', '.join(strategies)} on {args.workload} ({len(items)} queries)"
    report["workload"].update(kind=args.workload, rate_qps=args.rate, seed=args.seed)
    out = Path(args.out) if args.out else Path(settings.paths.reports) / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    write_all(out, report, runs.values())
    print_table(report)
    print(out)
    return EXIT_OK


def cmd_overhead(args: argparse.Namespace) -> int:
    from broker.connection import resolve
    from calm.bench.overhead import OverheadOptions, run_overhead
    from calm.fleets import fleet_dir
    from calm.report import write_report_json

    settings = settings_from(args)
    logs.setup("calm-bench", args.log_level or "WARNING", settings.log.json)
    resolved = resolve(settings.redis)
    try:
        fleet = fleet_dir(settings, profile="tiny")
        rates = tuple(float(r) for r in args.rates.split(",") if r.strip())
        options = OverheadOptions(rates=rates, seconds_per_rate=args.seconds, burst=args.burst, workers=args.workers,
                                  extra_sets=tuple(args.set))
        report = run(run_overhead(settings, resolved.url, fleet, options), settings.runtime)
    finally:
        resolved.close()
    out = Path(args.out) if args.out else Path(settings.paths.reports) / f"overhead-{time.strftime('%Y%m%d-%H%M%S')}"
    write_report_json(out, report)
    print(json.dumps(report["overhead"], indent=2))
    print(out)
    return EXIT_OK
