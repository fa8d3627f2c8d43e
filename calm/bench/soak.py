"""``calm bench soak``: the whole system at a steady rate for minutes, watching for leaks and unbounded streams.

Every ``sample_s`` it records the resident memory of every actor and worker (by the pids they publish in
the knowledge base) and the length of every stream under the run's prefix. The verdict comes from those
samples only: per process, the RSS slope (least squares) over the second half of the run; per stream, its
longest length against the MAXLEN CALM trims it to (or that it has none) and its growth over the second half.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.config import Settings
from broker.names import Names

if TYPE_CHECKING:  # the parser is built on every ``calm`` call: the system's imports wait for a soak
    import redis.asyncio as aioredis

log = logging.getLogger(__name__)
APPROX_TRIM_SLACK = 100  # MAXLEN ~ trims whole macro nodes: a stream may run this far over its limit


@dataclass(frozen=True, slots=True)
class SoakOptions:
    minutes: float = 10.0
    rate_qps: float = 5.0
    sample_s: float = 10.0
    workers: int = 1
    rss_growth_mb_per_min: float = 1.0  # a process whose RSS grows faster over the second half is flagged
    caches: bool = False  # off: prompts repeat, and every query should still reach a model
    drain_timeout_s: float = 120.0
    extra_sets: tuple[str, ...] = ()  # --set overrides passed on to every process of the system


def add_parser(sub: Any, add_common: Any) -> None:
    """Add ``bench soak`` to the ``bench`` subparsers."""
    soak = sub.add_parser("soak", help="run the system at a steady rate; sample RSS and stream lengths")
    add_common(soak, keep_earlier=True)
    soak.add_argument("--minutes", type=float, default=10.0, help="how long to send queries (default 10)")
    soak.add_argument("--rate", type=float, default=5.0, help="queries per second, evenly spaced (default 5)")
    soak.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples (default 10)")
    soak.add_argument("--workers", type=int, default=1)
    soak.add_argument("--profile", default="tiny", help="fleet profile to build when no --fleet is given (tiny)")
    soak.add_argument("--rss-growth-mb-per-min", type=float, default=1.0,
                      help="RSS slope over the second half that counts as growth (default 1.0 MB/min)")
    soak.add_argument("--caches", action="store_true",
                      help="keep the reply caches on (default off, so repeated prompts still run a model)")
    soak.add_argument("--out", help="report directory (default reports/soak-<time>)")


def cmd_soak(args: argparse.Namespace) -> int:
    from broker.connection import resolve
    from calm import logs
    from calm.cli import EXIT_OK, UsageError, settings_from
    from calm.fleets import fleet_dir
    from calm.report import write_report_json

    if args.minutes <= 0 or args.rate <= 0 or args.sample_s <= 0 or args.workers < 1:
        raise UsageError("--minutes, --rate and --sample-s must be > 0 and --workers at least 1")
    settings = settings_from(args)
    logs.setup("calm-bench", args.log_level or "WARNING", settings.log.json)
    options = SoakOptions(minutes=args.minutes, rate_qps=args.rate, sample_s=args.sample_s, workers=args.workers,
                          rss_growth_mb_per_min=args.rss_growth_mb_per_min, caches=args.caches,
                          extra_sets=tuple(args.set))
    resolved = resolve(settings.redis)
    try:
        fleet = fleet_dir(settings, profile=args.profile)
        report = asyncio.run(run_soak(settings, resolved.url, fleet, options))
    finally:
        resolved.close()
    out = Path(args.out) if args.out else Path(settings.paths.reports) / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    write_report_json(out, report)
    print(json.dumps(report["verdict"], indent=2))
    print(out)
    return EXIT_OK


# -- measuring -----------------------------------------------------------------------
def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` in MB (psutil when installed, else /proc); None when it is gone."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return float(psutil.Process(pid).memory_info().rss) / 2**20
        except psutil.Error:
            return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


async def stream_lengths(client: aioredis.Redis, names: Names) -> dict[str, int]:
    """XLEN of every stream under the prefix (keyed without the prefix)."""
    out: dict[str, int] = {}
    async for key in client.scan_iter(match=f"{names.prefix}*", count=1000, _type="stream"):
        name = key.decode() if isinstance(key, bytes) else str(key)
        out[name[len(names.prefix):]] = int(await client.xlen(name))
    return dict(sorted(out.items()))


async def take_sample(client: aioredis.Redis, settings: Settings, url: str, names: Names, t_s: float,
                      sent: int, replied: int) -> dict[str, Any]:
    from calm.status import snapshot

    status = await snapshot(settings, url)
    pids = {key: int(a["pid"]) for key, a in sorted(status["actors"].items()) if a.get("pid")}
    rss = {key: round(mb, 2) for key, pid in pids.items() if (mb := rss_mb(pid)) is not None}
    return {"t_s": round(t_s, 2), "sent": sent, "replied": replied, "pids": pids, "rss_mb": rss,
            "xlen": await stream_lengths(client, names)}


# -- the verdict ---------------------------------------------------------------------
def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute; None under two distinct times."""
    if len({t for t, _ in points}) < 2:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 60


UNBOUNDED_SHARE = 0.05


def stream_limit(stream: str, settings: Settings) -> int | None:
    """The MAXLEN CALM trims ``stream`` (name without prefix) to; None when nothing trims it."""
    s = settings.streams
    if stream == "queries":
        return None  # clients XADD without MAXLEN; the monitor trims it by age (streams.retain_acked_s)
    if stream == "replies" or stream.startswith("replies:"):
        return s.replies_maxlen
    if stream == "dead":
        return s.dead_maxlen
    if stream == "decisions":
        return s.decisions_maxlen
    return s.maxlen


def verdict(samples: list[dict[str, Any]], settings: Settings, options: SoakOptions) -> dict[str, Any]:
    """Growth per process and per stream, from ``samples`` alone."""
    end = samples[-1]["t_s"]
    second_half = [s for s in samples if s["t_s"] >= end / 2]
    processes: dict[str, Any] = {}
    problems: list[str] = []
    for key in sorted({k for s in samples for k in s["rss_mb"]}):
        series = [(s["t_s"], s["rss_mb"][key]) for s in samples if key in s["rss_mb"]]
        slope = slope_per_min([(t, v) for t, v in series if t >= end / 2])
        pids = sorted({s["pids"][key] for s in samples if key in s["pids"]})
        growing = slope is not None and slope > options.rss_growth_mb_per_min
        processes[key] = {"rss_start_mb": series[0][1], "rss_end_mb": series[-1][1],
                          "rss_max_mb": max(v for _, v in series), "samples": len(series),
                          "second_half_slope_mb_per_min": None if slope is None else round(slope, 3),
                          "pids": pids, "growing": growing}
        if growing:
            problems.append(f"{key}: RSS grows {slope:.2f} MB/min over the second half")
        if len(pids) > 1:
            problems.append(f"{key}: restarted during the soak (pids {pids})")
    streams: dict[str, Any] = {}
    for name in sorted({k for s in samples for k in s["xlen"]}):
        lengths = [s["xlen"].get(name, 0) for s in samples]
        slope = slope_per_min([(s["t_s"], s["xlen"].get(name, 0)) for s in second_half])
        limit = stream_limit(name, settings)
        over = limit is not None and max(lengths) > limit + APPROX_TRIM_SLACK
        # no MAXLEN (the ingress stream, trimmed by age): growing by more than 5 % of arrivals is unbounded
        unbounded = limit is None and slope is not None and slope > UNBOUNDED_SHARE * options.rate_qps * 60
        streams[name] = {"max_len": max(lengths), "end_len": lengths[-1], "maxlen": limit,
                         "second_half_growth_per_min": None if slope is None else round(slope, 1),
                         "over_maxlen": over, "unbounded_growth": unbounded}
        if over:
            problems.append(f"{name}: {max(lengths)} entries, over its MAXLEN {limit}")
        if unbounded:
            problems.append(f"{name}: grows {slope:.0f} entries/min over the second half: nothing trims it")
    return {"ok": not problems, "problems": problems, "processes": processes, "streams": streams,
            "rss_growth_mb_per_min_limit": options.rss_growth_mb_per_min}


# -- the run -------------------------------------------------------------------------
async def run_soak(settings: Settings, url: str, fleet_dir: Path, options: SoakOptions) -> dict[str, Any]:
    """Start a fresh system under its own prefix, load it for ``options.minutes``, and sample it."""
    from broker.connection import client as make_client
    from calm.bench.live import drop_keys
    from calm.client import ReplyCollector
    from calm.report import machine_info
    from calm.system import SystemSpec, running_system
    from calm.workload import read_eval_sets, shifting_mix
    from workers.fleet.spec import load_fleet

    fleet = load_fleet(fleet_dir)
    seconds = options.minutes * 60
    items = shifting_mix(read_eval_sets(dict(fleet.eval_sets)), max(1, int(seconds * options.rate_qps)),
                         options.rate_qps, seed=11, phases=1, dominant_share=1 / max(1, len(fleet.eval_sets)))
    prefix = f"{settings.redis.prefix}soak-{uuid.uuid4().hex[:6]}:"
    names = Names(prefix)
    run_settings = settings.replace({"redis.prefix": prefix})
    client = make_client(url, run_settings.redis)
    samples: list[dict[str, Any]] = []
    caches = () if options.caches else ("--set=cache.exact=false", "--set=cache.semantic=false")
    sets = ("--set=log.level=WARNING", *caches, *(f"--set={s}" for s in options.extra_sets))
    system = SystemSpec(workers=options.workers, passthrough=sets)
    try:
        async with running_system(run_settings, url, fleet_dir, system):
            collector = ReplyCollector(client, names, "soak")
            started = time.monotonic()
            sent: list[str] = []

            async def sample() -> None:
                await collector.poll(block_ms=1)
                samples.append(await take_sample(client, run_settings, url, names, time.monotonic() - started,
                                                 len(sent), len(collector.replies)))

            await sample()
            next_sample = started + options.sample_s
            for i, item in enumerate(items):  # evenly spaced: a steady rate, not Poisson bursts
                at = started + i / options.rate_qps
                while time.monotonic() < at:
                    if time.monotonic() >= next_sample:
                        await sample()
                        next_sample += options.sample_s
                    await asyncio.sleep(max(0.0, min(at, next_sample) - time.monotonic()))
                sent.append(await collector.send(item.prompt, f"soak-{i}", max_new_tokens=item.max_new_tokens))
                if i % 50 == 0:
                    await collector.poll(block_ms=1)
            await collector.wait_for(sent, options.drain_timeout_s)
            await sample()
            extra = len(collector.extra)
            await collector.close()
    finally:
        await drop_keys(client, prefix)  # the samples hold what the run's keys showed
        await client.aclose()
    replies = collector.replies
    statuses: dict[str, int] = {}
    for reply in replies.values():
        statuses[reply.get("status", "?")] = statuses.get(reply.get("status", "?"), 0) + 1
    return {
        "title": f"calm bench soak: {options.minutes:g} min at {options.rate_qps:g} q/s",
        "soak": {"minutes": options.minutes, "rate_qps": options.rate_qps, "sample_s": options.sample_s,
                 "workers": options.workers, "caches": options.caches, "prefix": prefix, "sent": len(sent),
                 "replied": len(replies), "unanswered": len(set(sent) - set(replies)), "duplicate_replies": extra,
                 "statuses": statuses},
        "samples": samples,
        "verdict": verdict(samples, run_settings, options),
        "machine": machine_info(),
        "fleet": {"dir": str(fleet_dir), "name": fleet.name, "models": list(fleet.names)},
    }
