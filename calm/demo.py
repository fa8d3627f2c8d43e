"""``calm demo``: the fleet under CALM against one baseline model, live, on the same workload."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.config import Settings
from calm.bench.live import BenchOptions, run_bench
from calm.report import write_all
from calm.workload import queries_for, read_eval_sets, shifting_mix
from workers.fleet.spec import load_fleet

DEMO_STRATEGIES = ["calm", "single"]


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


async def run_demo(settings: Settings, url: str, fleet_dir: Path, options: DemoOptions) -> tuple[Path, dict[str, Any]]:
    """Replay one workload with CALM choosing and with every query pinned to the baseline; write the report."""
    fleet = load_fleet(fleet_dir)
    baseline = fleet.baseline()
    if baseline is None:
        raise ValueError(f"fleet {fleet_dir} has no baseline model (a card with baseline = true)")
    items = shifting_mix(read_eval_sets(dict(fleet.eval_sets)), queries_for(options.queries), options.rate_qps,
                         options.seed)
    bench = BenchOptions(workers=options.workers, timeout_s=options.timeout_s, progress=options.progress,
                         child_log_level=options.child_log_level)
    runs, report = await run_bench(settings, url, fleet_dir, items, DEMO_STRATEGIES, bench)
    report["title"] = f"CALM vs single-model baseline ({baseline.name}) on fleet {fleet.name}"
    report["workload"].update(rate_qps=options.rate_qps, seed=options.seed)
    out = options.out or Path(settings.paths.reports) / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    return write_all(out, report, runs.values()), report
