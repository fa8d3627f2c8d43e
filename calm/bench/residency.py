"""``calm bench residency``: the trace, the capacity and the fleet's model sizes in; a comparison out."""

from __future__ import annotations

import argparse
import json
import tomllib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from broker.config import Settings
from calm.bench.simulator import POLICY_NAMES, compare
from calm.bench.traces import Request, TraceError, TraceSpec, generate, read_trace, write_trace
from workers.fleet.spec import FLEET_FILE, FleetError, ModelCard


def fleet_cards(directory: Path) -> list[ModelCard]:
    """The model cards of a fleet's ``fleet.toml`` (the weights need not be there: only cards are used)."""
    path = Path(directory).expanduser() / FLEET_FILE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise FleetError(f"{path}: missing (a fleet directory needs a {FLEET_FILE})") from e
    except tomllib.TOMLDecodeError as e:
        raise FleetError(f"{path}: not valid TOML: {e}") from e
    tables = data.get("models", [])
    if not isinstance(tables, list) or not tables:
        raise FleetError(f"{path}: lists no models")
    return [ModelCard.from_toml(t, str(path)) for t in tables]


class Resolver:
    """Maps a trace row's ``model`` or ``domain`` to a model (a domain goes to its specialist)."""

    def __init__(self, cards: Sequence[ModelCard] | None) -> None:
        self.cards = list(cards or [])
        self.names = {c.name for c in self.cards}

    def __call__(self, kind: str, name: str) -> str:
        if kind == "model":
            if self.cards and name not in self.names:
                raise TraceError(f"model {name!r} is not in the fleet ({', '.join(sorted(self.names))})")
            return name
        if not self.cards:
            raise TraceError(f"domain {name!r} needs --fleet to find its specialist")
        for pick in (lambda c: not c.baseline and c.domains[:1] == (name,),
                     lambda c: not c.baseline and name in c.domains,
                     lambda c: c.baseline and name in c.domains,
                     lambda c: c.baseline):
            found = next((c.name for c in self.cards if pick(c)), None)
            if found:
                return found
        raise TraceError(f"no model of the fleet serves domain {name!r}")


def load_trace(args: argparse.Namespace, cards: list[ModelCard] | None) -> list[Request]:
    if args.trace:
        return read_trace(Path(args.trace), Resolver(cards))
    models = tuple(c.name for c in cards) if cards else tuple(f"m{i}" for i in range(args.models))
    hot = args.hot or min(args.slots or 3, len(models))
    spec = TraceSpec(args.synthetic, models, requests=args.requests, rate=args.rate, hot=hot,
                     hot_share=args.hot_share, phase_s=args.phase_s, period_s=args.period_s, seed=args.seed)
    trace = generate(spec)
    if args.out:
        write_trace(trace, Path(args.out))
    return trace


def capacity(args: argparse.Namespace, trace: Sequence[Request], cards: list[ModelCard] | None
             ) -> tuple[float, dict[str, float], str]:
    """The budget, each model's size, and the unit both are in."""
    models = sorted({r.model for r in trace} | {c.name for c in cards or []})
    if args.slots is not None:
        if args.slots < 1:
            raise ValueError("--slots must be at least 1")
        return float(args.slots), dict.fromkeys(models, 1.0), "slots"
    if not cards:
        raise ValueError("--memory-mb needs --fleet (model sizes come from its cards)")
    sizes = {c.name: float(c.memory_mb) for c in cards}
    missing = sorted(m for m in models if sizes.get(m, 0.0) <= 0)
    if missing:
        raise ValueError(f"fleet cards lack memory_mb for {', '.join(missing)}; use --slots")
    return float(args.memory_mb), {m: sizes[m] for m in models}, "MB"


def cmd_residency(args: argparse.Namespace) -> int:
    from calm.cli import UsageError, settings_from

    settings = settings_from(args)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = sorted(set(policies) - set(POLICY_NAMES))
    if unknown or not policies:
        raise UsageError(f"--policies takes {', '.join(POLICY_NAMES)}; got {args.policies!r}")
    if args.load_s < 0:
        raise UsageError("--load-s must be >= 0")
    if args.live:
        from calm.bench.residency_live import cmd_live_residency

        return cmd_live_residency(args, settings)
    cards = fleet_cards(Path(settings.paths.fleet)) if settings.paths.fleet else None
    trace = load_trace(args, cards)
    budget, memory, unit = capacity(args, trace, cards)
    results = compare(trace, budget, memory, settings.scheduler, args.load_s, policies)
    report: dict[str, Any] = {
        "policies": results,
        "trace": trace_summary(args, trace),
        "capacity": {"budget": budget, "unit": unit, "memory": memory, "load_s": args.load_s},
        "scheduler": scheduler_summary(settings),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        show(report)
    return 0


def trace_summary(args: argparse.Namespace, trace: Sequence[Request]) -> dict[str, Any]:
    return {"source": args.trace or f"synthetic:{args.synthetic}", "requests": len(trace),
            "models": dict(Counter(r.model for r in trace).most_common()),
            "span_s": round(trace[-1].t - trace[0].t, 3)}


def scheduler_summary(settings: Settings) -> dict[str, Any]:
    return {k: getattr(settings.scheduler, k) for k in (
        "forecaster", "alpha", "beta", "gamma", "season_s", "bucket_s", "horizon_s", "hysteresis",
        "min_residency_s", "window_s", "interval_ms", "react_ms")}


def show(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    trace, cap = report["trace"], report["capacity"]
    table = Table(title=f"residency: {trace['source']}, {trace['requests']} requests over {trace['span_s']:.0f}s, "
                        f"budget {cap['budget']:g} {cap['unit']}, load {cap['load_s']:g}s",
                  caption=f"wasted: {cap['unit']}·s held by loads that served nothing")
    for col in ("policy", "cold", "rate", "vs lru", "vs belady", "loads", "evicts", "wasted", "unserved"):
        table.add_column(col, justify="left" if col == "policy" else "right", no_wrap=True)
    for name, row in report["policies"].items():
        table.add_row(name, str(row["cold_loads"]), f"{row['cold_load_rate']:.4f}", _ratio(row["vs_lru"]),
                      _ratio(row["vs_belady"]), str(row["loads"]), str(row["evictions"]),
                      f"{row['wasted_mb_s']:.0f}", str(row["unserved"]))
    console = Console()
    console.width = max(console.width, 110)  # nine numeric columns: do not squeeze them into 80 when piped
    console.print(table)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"
