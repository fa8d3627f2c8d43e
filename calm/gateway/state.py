"""The dashboard's data (``GET /api/state``): fleet, placement, recent decisions, charts and domain mix."""

from __future__ import annotations

from typing import Any

from calm.gateway.events import EventTail
from calm.gateway.snapshot import Snapshot


def dashboard_state(snapshot: Snapshot, events: EventTail, worker_timeout_s: float,
                    gateway: dict[str, Any]) -> dict[str, Any]:
    """Everything the dashboard draws, as JSON-ready data."""
    now_ms = snapshot.at_ms
    counts = events.counts
    models = [
        {"name": name, "domains": list(m.domains), "baseline": m.baseline, "loaded_on": list(m.loaded_on),
         "requests": m.requests, "errors": m.errors, "latency_ms": m.latency_ms, "tokens_per_s": m.tokens_per_s,
         "energy_per_token_j": m.energy_per_token_j, "confidence": m.confidence, "error_rate": m.error_rate,
         "queue": snapshot.work[name].depth if name in snapshot.work else 0}
        for name, m in sorted(snapshot.models.items())
    ]
    workers = [
        {"id": wid, "device": w.device, "type": w.type, "alive": w.alive(now_ms, worker_timeout_s),
         "memory_used_mb": round(w.memory_used_mb, 1), "memory_budget_mb": round(w.memory_budget_mb, 1),
         "models_loaded": list(w.models_loaded), "inflight": w.inflight,
         "heartbeat_age_s": round(max(0.0, now_ms - w.heartbeat_ms) / 1000, 1)}
        for wid, w in sorted(snapshot.workers.items())
    ]
    actors = [{"role": a.get("role", "?"), "instance": a.get("instance", "?"), "pid": a.get("pid", "")}
              for a in sorted(snapshot.actors, key=lambda a: (a.get("role", ""), a.get("instance", "")))]
    totals = {
        "inferences": sum(counts.inferences.values()),
        "energy_j": round(sum(counts.energy_j.values()), 4),
        "tokens_out": sum(n for (_, direction), n in counts.tokens.items() if direction == "out"),
        "dead_letters": sum(counts.dead.values()),
        "decisions": sum(counts.decisions.values()),
        "loads": sum(n for (event, _, _), n in counts.worker_events.items() if event == "loaded"),
        "evictions": sum(n for (event, _, _), n in counts.worker_events.items() if event == "evicted"),
    }
    return {
        "at_ms": now_ms, "gateway": gateway, "models": models, "workers": workers, "actors": actors,
        "decisions": list(reversed(counts.recent)), "domains": dict(counts.domains.most_common()),
        "series": events.series(), "totals": totals,
        "queues": {f"{stream} ({group})": b.depth for (stream, group), b in sorted(snapshot.stages.items())},
    }
