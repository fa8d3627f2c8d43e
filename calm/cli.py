"""``calm``: one command line for running, querying and inspecting CALM."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from broker.config import Settings, load_settings
from broker.connection import redact, resolve
from broker.errors import BrokerError
from calm import logs

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 on usage errors; keep the one-line reason
        self.print_usage(sys.stderr)
        raise UsageError(message)


def _common(p: argparse.ArgumentParser, *, keep_earlier: bool = False) -> None:
    """The options every command takes. ``keep_earlier`` (on a sub-subcommand such as ``bench routing``):
    options not given after the subcommand keep what was given before it (``calm bench --fleet X routing``)."""
    unset: Any = argparse.SUPPRESS if keep_earlier else None
    p.add_argument("--config", default=unset, help="TOML config file (or CALM_CONFIG)")
    p.add_argument("--redis-url", default=unset,
                   help="Redis URL (or CALM_REDIS_URL); default: local server, else embedded")
    p.add_argument("--prefix", default=unset, help="key prefix (or CALM_PREFIX), default 'calm:'")
    p.add_argument("--fleet", default=unset, help="fleet directory (or CALM_FLEET); default: the demo fleet")
    p.add_argument("--set", action="append", default=argparse.SUPPRESS if keep_earlier else [],
                   metavar="SECTION.FIELD=VALUE",
                   help="override any setting, e.g. --set planner.w_latency=0.5 (repeatable)")
    p.add_argument("--log-level", default=unset, help="DEBUG, INFO, WARNING ...")
    p.add_argument("--log-json", action="store_true", default=unset, help="log JSON lines")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="calm", description="CALM: self-adaptive orchestration of small language model fleets.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    up = sub.add_parser("up", help="run the whole system (actors + workers) until Ctrl-C")
    _common(up)
    up.add_argument("--workers", type=int, default=1, help="worker processes to start (default 1)")
    up.add_argument("--memory-mb", type=int, help="memory budget per worker")
    up.add_argument("--device", choices=["cpu", "cuda", "auto"], help="device of the workers")
    up.add_argument("--profile", default="demo", help="fleet profile to build when no --fleet is given")

    actor = sub.add_parser("actor", help="run one MAPE-K actor process")
    _common(actor)
    actor.add_argument("role", choices=["monitor", "analyzer", "planner", "executor", "scheduler"])

    worker = sub.add_parser("worker", help="run one SLM worker process")
    _common(worker)
    worker.add_argument("--models", help="comma-separated models this worker may serve (default all)")
    worker.add_argument("--memory-mb", type=int, help="memory budget for loaded models")
    worker.add_argument("--device", choices=["cpu", "cuda", "auto"])
    worker.add_argument("--id", dest="worker_id", help="worker id (default host-pid)")
    worker.add_argument("--preload", help="comma-separated models to load at start")
    worker.add_argument("--type", dest="worker_type", help="worker type label it registers as (default onnx)")
    worker.add_argument("--engine", help="engine factory 'package.module:function' (default: built-in ONNX)")

    query = sub.add_parser("query", help="send one query and print the reply")
    _common(query)
    query.add_argument("text")
    query.add_argument("--model", default=None, help="pin a model (default: CALM chooses)")
    query.add_argument("--max-new-tokens", type=int)
    query.add_argument("--temperature", type=float)
    query.add_argument("--timeout", type=float, default=60.0)
    query.add_argument("--json", action="store_true", help="print the whole reply as JSON")

    status = sub.add_parser("status", help="show models, workers and actors from the knowledge base")
    _common(status)
    status.add_argument("--json", action="store_true")
    status.add_argument("--decisions", type=int, nargs="?", const=10, default=0, help="show the latest decisions")

    demo = sub.add_parser("demo", help="the fleet under CALM vs the single baseline model, live, with a report")
    _common(demo)
    demo.add_argument("--profile", default="demo", help="fleet profile to build when no --fleet is given")
    demo.add_argument("--queries", default="small", help="small, medium, large or a number (default small)")
    demo.add_argument("--rate", type=float, default=3.0, help="arrivals per second, Poisson (default 3)")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--workers", type=int, default=1)
    demo.add_argument("--out", help="report directory (default reports/demo-<time>)")

    config = sub.add_parser("config", help="show the settings, or retune running actors (planner weights)")
    csub = config.add_subparsers(dest="subcommand", required=True, parser_class=Parser)
    show = csub.add_parser("show", help="print the effective settings and the runtime overrides as JSON")
    _common(show)
    tune = csub.add_parser("set", help="set runtime overrides, e.g. planner.w_latency=0.5 (applied within 1 s)")
    _common(tune)
    tune.add_argument("pairs", nargs="+", metavar="SECTION.FIELD=VALUE")
    unset = csub.add_parser("unset", help="remove runtime overrides")
    _common(unset)
    unset.add_argument("keys", nargs="+", metavar="SECTION.FIELD")

    fleet = sub.add_parser("fleet", help="build, list or export fleets")
    fsub = fleet.add_subparsers(dest="fleet_command", required=True, parser_class=Parser)
    build = fsub.add_parser("build", help="build a fleet (or find it in the cache); prints its directory")
    _common(build)
    build.add_argument("--profile", default="demo", help="tiny or demo")
    build.add_argument("--out", help="build into this directory instead of the cache")
    listing = fsub.add_parser("list", help="list a fleet's models")
    _common(listing)
    listing.add_argument("--json", action="store_true")
    evaluate = fsub.add_parser("evaluate", help="measure models' held-out quality on the fleet's eval sets "
                               "and write it into their cards (what the router's quality floor compares)")
    _common(evaluate)
    evaluate.add_argument("--models", nargs="*", default=[], help="only these models (default: all)")
    export = fsub.add_parser("export", help="export a Hugging Face causal LM checkpoint into a fleet")
    _common(export)
    export.add_argument("checkpoint", help="local checkpoint directory (or a hub id where you have one)")
    export.add_argument("--name", required=True)
    export.add_argument("--description", required=True)
    export.add_argument("--examples", nargs="*", default=[])
    export.add_argument("--prompt-template", default="{prompt}")
    export.add_argument("--domains", nargs="*", default=[])
    export.add_argument("--int8", action="store_true")
    for module in _command_modules():
        module.register(sub, _common)
    return parser


# Further commands live in their own modules, each with ``register(subparsers, add_common)`` and ``COMMANDS``.
COMMAND_MODULES: tuple[str, ...] = ("calm.gateway.cli", "calm.bench")


def _command_modules() -> list[Any]:
    import importlib

    return [importlib.import_module(name) for name in COMMAND_MODULES]


def _handler(args: argparse.Namespace) -> Callable[[argparse.Namespace], int]:
    key = args.command
    if args.command == "fleet":
        key = f"fleet {args.fleet_command}"
    elif getattr(args, "subcommand", None):
        key = f"{args.command} {args.subcommand}"
    elif getattr(args, "subcommand", "") is None:  # a command group run without a subcommand
        key = args.command
    table = dict(COMMANDS)
    for module in _command_modules():
        table.update(module.COMMANDS)
    return table[key]


def settings_from(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Settings:
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set needs SECTION.FIELD=VALUE, got {item!r}")
        overrides[key.strip()] = value
    flat = {"redis.url": args.redis_url, "redis.prefix": args.prefix, "paths.fleet": args.fleet,
            "log.level": args.log_level, "log.json": args.log_json, **(extra or {})}
    overrides.update({k: v for k, v in flat.items() if v is not None})
    return load_settings(args.config, overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    previous = _terminate_as_interrupt()
    try:
        args = parser.parse_args(argv)
        return _handler(args)(args)
    except UsageError as e:
        print(f"calm: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except (BrokerError, OSError, ValueError, TimeoutError, RuntimeError) as e:
        print(f"calm: {e}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    """Run what Ctrl-C would: the SIGINT handler in place (``asyncio.run``'s cancels its main task and wakes
    its loop; Python's default raises KeyboardInterrupt), or raise KeyboardInterrupt when SIGINT is ignored:
    a command started in the background by a non-interactive shell inherits SIGINT ignored, and raising
    SIGINT there did nothing."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def _terminate_as_interrupt() -> Any:
    """Handle SIGTERM as Ctrl-C, so a command that runs a system (``calm bench``, ``calm demo``) stops it
    before leaving (Python's default would end at once and leave it running). Commands that serve until
    SIGTERM install their own handler over this one. Returns the handler it replaced (None: not replaced,
    off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupt)


# -- commands ------------------------------------------------------------------------
def cmd_actor(args: argparse.Namespace) -> int:
    from calm.roles import serve_actor

    settings = settings_from(args)
    logs.setup(args.role, settings.log.level, settings.log.json)
    url = _server_url(settings)
    fleet = None
    if args.role == "monitor":
        from calm.fleets import fleet_dir

        fleet = fleet_dir(settings)
    from broker.eventloop import run

    return run(serve_actor(args.role, settings, url, fleet), settings.runtime)


def cmd_worker(args: argparse.Namespace) -> int:
    from calm.fleets import fleet_dir
    from calm.roles import serve_worker

    extra = {"worker.models": args.models, "worker.memory_mb": args.memory_mb, "worker.device": args.device,
             "worker.worker_id": args.worker_id, "worker.preload": args.preload, "worker.type": args.worker_type,
             "worker.engine": args.engine}
    settings = settings_from(args, {k: v for k, v in extra.items() if v is not None})
    logs.setup("worker", settings.log.level, settings.log.json)
    from broker.eventloop import run

    return run(serve_worker(settings, _server_url(settings), fleet_dir(settings)), settings.runtime)


def cmd_up(args: argparse.Namespace) -> int:
    from calm.fleets import fleet_dir
    from calm.roles import ROLES
    from calm.system import running_system

    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    settings = settings_from(args)
    logs.setup("calm-up", settings.log.level, settings.log.json)
    fleet = fleet_dir(settings, profile=args.profile)
    resolved = resolve(settings.redis)
    if resolved.embedded is not None:
        print(f"embedded Valkey started at {resolved.url} (pid {resolved.embedded.pid})", flush=True)

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with running_system(settings, resolved.url, fleet, _system_spec(args)):
            print(f"CALM ready: {len(ROLES)} actors and {args.workers} worker(s) on {redact(resolved.url)}, "
                  f"prefix {settings.redis.prefix!r}, fleet {fleet} (supervisor pid {os.getpid()})", flush=True)
            await stop.wait()
        return EXIT_OK

    try:
        return asyncio.run(run())
    finally:
        resolved.close()


def _system_spec(args: argparse.Namespace) -> Any:
    from calm.system import SystemSpec

    passthrough = [f"--set={s}" for s in args.set]
    if args.config:
        passthrough.append(f"--config={args.config}")
    return SystemSpec(workers=args.workers, memory_mb=args.memory_mb, device=args.device,
                      passthrough=tuple(passthrough))


def cmd_demo(args: argparse.Namespace) -> int:
    from calm.demo import DemoOptions, run_demo
    from calm.fleets import fleet_dir
    from calm.report import print_table

    settings = settings_from(args)
    logs.setup("calm-demo", settings.log.level if args.log_level else "WARNING", settings.log.json)
    resolved = resolve(settings.redis)
    if resolved.embedded is not None:
        print(f"embedded Valkey started at {resolved.url} (pid {resolved.embedded.pid})", flush=True)
    try:
        fleet = fleet_dir(settings, profile=args.profile)
        options = DemoOptions(queries=args.queries, rate_qps=args.rate, seed=args.seed, workers=args.workers,
                              out=Path(args.out) if args.out else None,
                              child_log_level=settings.log.level if args.log_level else "WARNING")
        out, report = asyncio.run(run_demo(settings, resolved.url, fleet, options))
    finally:
        resolved.close()
    print_table(report)
    print(out)
    return EXIT_OK


def cmd_query(args: argparse.Namespace) -> int:
    from broker.connection import client
    from broker.names import Names
    from calm.client import ask

    settings = settings_from(args)
    url = _server_url(settings)

    async def run() -> dict[str, str]:
        redis = client(url, settings.redis)
        try:
            return dict(await ask(redis, Names(settings.redis.prefix), args.text, timeout_s=args.timeout,
                                  model=args.model, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature))
        finally:
            await redis.aclose()

    reply = asyncio.run(run())
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        print(reply.get("text", ""))
        print(f"[{reply.get('status')}] model={reply.get('model')} worker={reply.get('worker')} "
              f"latency={reply.get('latency_ms')} ms energy={reply.get('energy_j')} J ({reply.get('energy_source')})"
              + (f" error={reply.get('error')}" if reply.get("error") else ""), file=sys.stderr)
    return EXIT_OK if reply.get("status") == "ok" else EXIT_FAIL


def cmd_status(args: argparse.Namespace) -> int:
    from calm.status import print_status

    settings = settings_from(args)
    url = _server_url(settings)
    return print_status(settings, url, as_json=args.json, decisions=args.decisions)


def cmd_fleet_build(args: argparse.Namespace) -> int:
    from workers.fleet import build_fleet

    settings = settings_from(args)
    logs.setup("fleet", settings.log.level, settings.log.json)
    out = build_fleet(args.profile, Path(settings.paths.cache_dir).expanduser(),
                      out=Path(args.out) if args.out else None)
    print(out)
    return EXIT_OK


def cmd_fleet_list(args: argparse.Namespace) -> int:
    from broker.kb import QUALITY_SE_SUFFIX
    from calm.fleets import open_fleet

    fleet = open_fleet(settings_from(args))
    rows: list[dict[str, Any]] = [
        {"name": m.name, "domains": list(m.domains), "params": m.params, "memory_mb": m.memory_mb,
         "baseline": m.baseline, "quality": dict(m.quality), "path": str(fleet.model_dir(m))}
        for m in fleet.models
    ]
    if args.json:
        print(json.dumps({"fleet": str(fleet.root), "models": rows}, indent=2))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fleet {fleet.name} ({fleet.root})")
    for col in ("name", "domains", "params", "memory_mb", "baseline", "quality"):
        table.add_column(col)
    for r in rows:
        q = r["quality"]
        quality = ", ".join(
            f"{k}={v:.3f}" + (f"±{q[k + QUALITY_SE_SUFFIX]:.3f}" if k + QUALITY_SE_SUFFIX in q else "")
            for k, v in q.items() if not k.endswith(QUALITY_SE_SUFFIX))
        table.add_row(r["name"], ",".join(r["domains"]), f"{r['params']:,}", str(r["memory_mb"]),
                      "yes" if r["baseline"] else "", quality)
    Console().print(table)
    return EXIT_OK


def cmd_fleet_evaluate(args: argparse.Namespace) -> int:
    from calm.fleets import fleet_dir
    from workers.fleet.evaluate import evaluate_fleet

    settings = settings_from(args)
    logs.setup("fleet", settings.log.level, settings.log.json)
    fleet = evaluate_fleet(fleet_dir(settings), models=list(args.models))
    for card in fleet.models:
        if not args.models or card.name in args.models:
            print(card.name, json.dumps(dict(card.quality), sort_keys=True))
    return EXIT_OK


def cmd_fleet_export(args: argparse.Namespace) -> int:
    from calm.fleets import fleet_dir
    from workers.fleet import export_checkpoint_to_fleet

    settings = settings_from(args)
    logs.setup("fleet", settings.log.level, settings.log.json)
    target = fleet_dir(settings)
    card = export_checkpoint_to_fleet(Path(args.checkpoint), target, name=args.name, description=args.description,
                                      examples=list(args.examples), prompt_template=args.prompt_template,
                                      int8=args.int8, domains=list(args.domains))
    print(f"exported {getattr(card, 'name', args.name)} into {target}", file=sys.stderr)
    print(target)
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    from broker.connection import sync_client
    from broker.names import Names

    settings = settings_from(args)
    key = Names(settings.redis.prefix).runtime_config
    if args.subcommand == "show":
        overrides: dict[str, str] = {}
        try:
            raw: Any = sync_client(_server_url(settings), settings.redis).hgetall(key)
            overrides = {k.decode(): v.decode() for k, v in raw.items()}
        except BrokerError:
            pass  # no server: the file/env/flag settings alone
        print(json.dumps({"settings": settings.to_dict(), "runtime_overrides": overrides}, indent=2, default=str))
        return EXIT_OK
    redis = sync_client(_server_url(settings), settings.redis)
    if args.subcommand == "set":
        pairs = dict(p.partition("=")[::2] for p in args.pairs)
        settings.replace(pairs)  # validates names and values before anything is written
        redis.hset(key, mapping=pairs)
    else:
        redis.hdel(key, *args.keys)
    print(json.dumps({k.decode(): v.decode() for k, v in redis.hgetall(key).items()}))  # type: ignore[union-attr]
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "up": cmd_up, "demo": cmd_demo, "actor": cmd_actor, "worker": cmd_worker, "query": cmd_query, "status": cmd_status,
    "config show": cmd_config, "config set": cmd_config, "config unset": cmd_config,
    "fleet build": cmd_fleet_build, "fleet list": cmd_fleet_list, "fleet export": cmd_fleet_export,
    "fleet evaluate": cmd_fleet_evaluate,
}


def _server_url(settings: Settings) -> str:
    """The server to talk to; processes that are not the supervisor never start an embedded one."""
    from broker.config import DEFAULT_REDIS_URL
    from broker.connection import probe

    url = settings.redis.url or DEFAULT_REDIS_URL
    problem = probe(url, settings.redis.connect_timeout_s)
    if problem:
        hint = "" if settings.redis.url else " (set CALM_REDIS_URL, or start CALM with 'calm up')"
        raise BrokerError(f"{problem}{hint}")
    return url


