"""``calm bench``: benchmarks. ``calm bench residency`` replays arrival traces through every residency policy."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

RESIDENCY_HELP = """\
Replay an arrival trace through every residency policy (lru, demand60, static, forecast) and the
offline optimum (belady), in simulated time, on one worker of --slots K models or --memory-mb M.
The policies are the live scheduler's own code, configured as the scheduler is (--set
scheduler.alpha=0.3 ...; for a periodic trace, --set scheduler.forecaster=seasonal
--set scheduler.season_s=<cycle>).

Traces: --trace FILE (JSONL lines {"t": seconds, "model": NAME} or {"t": seconds, "domain": NAME};
or CSV with a header t,model or t,domain), or --synthetic steady|phase|periodic|burst (seeded; add
--out FILE to keep it). Domains resolve to the fleet's specialist for them.

Counted per policy: cold_loads (requests whose model was not loaded and ready when they arrived),
cold_load_rate, loads, evictions, unserved, wait_s, wasted_mb_s (memory x time held by loads that
served no request before eviction or the end; slot-seconds with --slots), vs_lru and vs_belady
(cold_load_rate relative to theirs). Loads take --load-s of simulated time (default 0: a paging
model where a miss is counted and the load is instant).

--live replays the trace in real time on the live system instead, once per policy (default lru and
forecast), each on a freshly started system with one worker whose budget holds --slots K models by
their cards' sizes and never K+1, the rest headroom for measured sizes above the cards' (or
--memory-mb M), caches off, every request pinned to the model the trace names.
cold_loads counts the planner's decisions whose model was not loaded when chosen; loads and evictions
count the worker's events. The report directory (--report-dir) holds report.json (with the simulated
figures for the same trace and capacity beside the live ones), replies.jsonl, events.jsonl and a
residency timeline per policy.
"""


def register(subparsers: Any, add_common: Callable[..., None]) -> None:
    """Add ``bench`` and its subcommands to the ``calm`` parser."""
    bench = subparsers.add_parser("bench", help="benchmarks: strategies live (default), overhead, residency")
    sub = bench.add_subparsers(dest="subcommand", required=False, parser_class=type(bench))
    add_common(bench)
    _live_arguments(bench)
    live = sub.add_parser("live", help="one workload through several routing strategies on the live system")
    add_common(live, keep_earlier=True)
    _live_arguments(live, keep_earlier=True)
    over = sub.add_parser("overhead", help="route_ms at rising rates, cache-hit throughput, broker hop floor")
    add_common(over, keep_earlier=True)
    over.add_argument("--rates", default="50,100,200,400,800", help="arrival rates to step through (q/s)")
    over.add_argument("--seconds", type=float, default=4.0, help="seconds per rate (default 4)")
    over.add_argument("--burst", type=int, default=3000, help="cache-hit queries sent at once (default 3000)")
    over.add_argument("--workers", type=int, default=1)
    over.add_argument("--out", help="report directory (default reports/overhead-<time>)")
    rout = sub.add_parser("routing", help="semantic routing accuracy on the fleet's held-out prompts (offline)")
    add_common(rout, keep_earlier=True)
    rout.add_argument("--profile", default="demo", help="fleet profile to build when no --fleet is given")
    rout.add_argument("--limit", type=int, help="at most this many prompts per domain")
    rout.add_argument("--draw", type=int, help="route this many fresh held-out prompts per domain instead of the "
                      "fleet's eval sets (drawn from the same held-out split, another seed)")
    rout.add_argument("--draw-seed", type=int, default=1, help="seed of the --draw sample (default 1)")
    rout.add_argument("--json", action="store_true", help="print the results as JSON")
    res = sub.add_parser("residency", help="replay an arrival trace through every residency policy",
                         description=RESIDENCY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(res, keep_earlier=True)
    source = res.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", help="trace file (JSONL or CSV)")
    source.add_argument("--synthetic", choices=["steady", "phase", "periodic", "burst"],
                        help="generate a standard trace instead of reading one")
    capacity = res.add_mutually_exclusive_group(required=True)
    capacity.add_argument("--slots", type=int, help="capacity of K models (every model takes one slot)")
    capacity.add_argument("--memory-mb", type=float, help="memory budget; model sizes from the fleet cards")
    res.add_argument("--json", action="store_true", help="print the results as JSON")
    res.add_argument("--load-s", type=float, default=0.0, help="simulated load time per model (default 0)")
    res.add_argument("--policies", default="lru,demand60,static,forecast,belady",
                     help="comma-separated policies to run (default all; with --live: lru,forecast)")
    live = res.add_argument_group("live runs")
    live.add_argument("--live", action="store_true", help="run the trace on the live system, per policy")
    live.add_argument("--report-dir", help="with --live: report directory (default reports/residency-<time>)")
    live.add_argument("--timeout-s", type=float, default=180.0, help="with --live: wait for last replies (180)")
    gen = res.add_argument_group("synthetic traces")
    gen.add_argument("--out", help="also write the synthetic trace to this JSONL file")
    gen.add_argument("--models", type=int, default=10,
                     help="without --fleet: how many models (m0, m1 ...) the trace spreads over (default 10)")
    gen.add_argument("--requests", type=int, default=10_000, help="arrivals (default 10000)")
    gen.add_argument("--rate", type=float, default=1.0, help="arrivals per second, Poisson (default 1)")
    gen.add_argument("--hot", type=int, help="models busy at a time (default: --slots, else 3)")
    gen.add_argument("--hot-share", type=float, default=0.95, help="share of traffic to the hot models (0.95)")
    gen.add_argument("--phase-s", type=float, default=1200.0, help="phase: seconds between mix changes (1200)")
    gen.add_argument("--period-s", type=float, default=3600.0, help="periodic: cycle length in seconds (3600)")
    gen.add_argument("--seed", type=int, default=0)
    from calm.bench.soak import add_parser as add_soak

    add_soak(sub, add_common)


def _live_arguments(p: argparse.ArgumentParser, keep_earlier: bool = False) -> None:
    """The live bench's options; with ``keep_earlier`` (on ``bench live``) those not given after ``live``
    keep what was given before it."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if keep_earlier else value

    p.add_argument("--profile", default=default("demo"), help="fleet profile to build when no --fleet is given")
    p.add_argument("--strategies", default=default("single,random,round-robin,semantic,calm-nocache,calm"),
                   help="comma-separated, run in this order on the same workload")
    p.add_argument("--workload", default=default("shift"),
                   help="steady, shift (phase shifts), burst, or a trace file")
    p.add_argument("--queries", default=default("medium"), help="small, medium, large or a number (default medium)")
    p.add_argument("--rate", type=float, default=default(3.0), help="arrivals per second, Poisson (default 3)")
    p.add_argument("--seed", type=int, default=default(7))
    p.add_argument("--workers", type=int, default=default(1))
    p.add_argument("--out", default=default(None), help="report directory (default reports/bench-<time>)")


def _live(args: argparse.Namespace) -> int:
    from calm.bench.commands import cmd_live

    return cmd_live(args)


def _overhead(args: argparse.Namespace) -> int:
    from calm.bench.commands import cmd_overhead

    return cmd_overhead(args)


def _residency(args: argparse.Namespace) -> int:
    from calm.bench.residency import cmd_residency

    return cmd_residency(args)


def _routing(args: argparse.Namespace) -> int:
    from calm.bench.routing import cmd_routing

    return cmd_routing(args)


def _soak(args: argparse.Namespace) -> int:
    from calm.bench.soak import cmd_soak

    return cmd_soak(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "bench": _live, "bench live": _live, "bench overhead": _overhead, "bench residency": _residency,
    "bench routing": _routing, "bench soak": _soak,
}
