"""``calm status``: the knowledge base's view of models, workers, actors and recent decisions."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from broker.config import Settings
from broker.connection import client
from broker.kb import KnowledgeBase
from broker.names import Names


async def snapshot(settings: Settings, url: str, decisions: int = 0) -> dict[str, Any]:
    """Models, workers, actors (and the latest decisions) as plain JSON-ready data."""
    redis = client(url, settings.redis)
    names = Names(settings.redis.prefix)
    kb = KnowledgeBase(redis, names)
    try:
        models = await kb.models()
        workers = await kb.workers()
        actors = await kb.actors()
        now_ms = time.time() * 1000
        out: dict[str, Any] = {
            "prefix": names.prefix,
            "models": {
                n: {"domains": list(m.domains), "params": m.params, "memory_mb": m.memory_mb, "baseline": m.baseline,
                    "loaded_on": list(m.loaded_on), "requests": m.requests, "errors": m.errors,
                    "latency_ms": m.latency_ms, "tokens_per_s": m.tokens_per_s,
                    "energy_per_token_j": m.energy_per_token_j, "confidence": m.confidence,
                    "error_rate": m.error_rate, "load_s": m.load_s, "quality": m.quality}
                for n, m in models.items()
            },
            "workers": {
                w.id: {"pid": w.pid, "host": w.host, "type": w.type, "device": w.device,
                       "memory_budget_mb": w.memory_budget_mb, "memory_used_mb": w.memory_used_mb,
                       "models_loaded": list(w.models_loaded), "models_servable": list(w.models_servable),
                       "inflight": w.inflight, "alive": w.alive(now_ms, settings.scheduler.worker_timeout_s),
                       "heartbeat_age_s": round((now_ms - w.heartbeat_ms) / 1000, 2)}
                for w in workers.values()
            },
            "actors": {f"{a.get('role')}:{a.get('instance')}": {"role": a.get("role"), "pid": int(a.get("pid", 0)),
                                                                 "instance": a.get("instance")} for a in actors},
            "loaded": {n: list(m.loaded_on) for n, m in models.items()},
        }
        if decisions:
            rows: Any = await redis.xrevrange(names.decisions, count=decisions)
            out["decisions"] = [
                {k.decode(): (json.loads(v) if k == b"candidates" else v.decode()) for k, v in fields.items()}
                for _, fields in rows
            ]
        return out
    finally:
        await redis.aclose()


def print_status(settings: Settings, url: str, as_json: bool, decisions: int) -> int:
    data = asyncio.run(snapshot(settings, url, decisions))
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    models = Table(title="models")
    for col in ("model", "domains", "loaded on", "requests", "latency ms", "tok/s", "J/token", "confidence", "errors"):
        models.add_column(col)
    for name, m in data["models"].items():
        models.add_row(name, ",".join(m["domains"]), ",".join(m["loaded_on"]) or "-", str(m["requests"]),
                       _num(m["latency_ms"]), _num(m["tokens_per_s"]), _num(m["energy_per_token_j"], 4),
                       _num(m["confidence"], 3), f"{m['error_rate']:.2f}")
    console.print(models)
    workers = Table(title="workers")
    for col in ("worker", "pid", "device", "memory MB", "loaded", "alive"):
        workers.add_column(col)
    for wid, w in data["workers"].items():
        workers.add_row(wid, str(w["pid"]), w["device"], f"{w['memory_used_mb']:.0f}/{w['memory_budget_mb']:.0f}",
                        ",".join(w["models_loaded"]) or "-", "yes" if w["alive"] else "NO")
    console.print(workers)
    actors = Table(title="actors")
    actors.add_column("actor")
    actors.add_column("pid")
    for name, a in data["actors"].items():
        actors.add_row(name, str(a["pid"]))
    console.print(actors)
    for d in data.get("decisions", []):
        console.print(f"[bold]{d['id']}[/] → {d['model']} ({d['reason']}; "
                      f"utility {d['utility']}, domain {d['domain']})")
        for c in d["candidates"]:
            console.print(f"    {c['model']:<12} fit={c['fit']:.3f} (cosine {c.get('cosine', 0.0):.3f}) "
                          f"lat={c['latency_ms']:.1f}ms E={c['energy_j']:.4f}J q={c['quality']:.3f} "
                          f"loaded={c['loaded']} u={c['utility']:.3f}")
    return 0


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


async def wait_routable(settings: Settings, url: str, workers: int, timeout_s: float = 120.0) -> None:
    """Wait until ``workers`` workers are registered, every model they serve has its routing profile and,
    with two specialists or more, the monitor has trained the domain classifier on all of them.

    ``timeout_s`` bounds the wait without progress: each worker that registers and each model that gets
    its profile restarts it (embedding a profile of 2,000 exemplars takes tens of seconds on a busy core).
    """
    redis = client(url, settings.redis)
    kb = KnowledgeBase(redis, Names(settings.redis.prefix))
    deadline = time.monotonic() + timeout_s
    progress = -1
    try:
        while True:
            registered = await kb.workers()
            models = await kb.models()
            servable = {m for w in registered.values() for m in w.models_servable}
            unprofiled = sorted(m for m in servable if m not in models or models[m].profile_rows <= 0)
            specialists = {m for m in servable if m in models and not models[m].baseline}
            # the classifier is trained on the profiles: no need to ask for it while any is missing
            classified = len(specialists) < 2 or (not unprofiled and set(await kb.classifier_models()) == specialists)
            if len(registered) >= workers and not unprofiled and classified:
                return
            done = len(registered) + len(servable) - len(unprofiled) + int(classified)
            if done > progress:
                progress, deadline = done, time.monotonic() + timeout_s
            if time.monotonic() > deadline:
                raise TimeoutError(f"models not routable: no progress for {timeout_s:.0f}s: {len(registered)}/"
                                   f"{workers} workers, unprofiled {unprofiled}"
                                   + ("" if classified else ", domain classifier not trained yet"))
            await asyncio.sleep(0.1)
    finally:
        await redis.aclose()
