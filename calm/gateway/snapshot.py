"""One read of the knowledge base and the streams' depths, shared by ``/metrics`` and the dashboard."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from broker.kb import KnowledgeBase, ModelState, WorkerState
from broker.names import Names

STAGE_STREAMS = ("queries", "analyze", "plan", "execute", "results", "telemetry", "sched")
LOG_STREAMS = ("dead", "decisions", "replies")


@dataclass(frozen=True, slots=True)
class Backlog:
    """A consumer group's work: entries not yet delivered (lag) and delivered but not acknowledged (pending)."""

    waiting: int = 0
    pending: int = 0

    @property
    def depth(self) -> int:
        return self.waiting + self.pending


@dataclass(frozen=True, slots=True)
class Snapshot:
    at_ms: float
    models: dict[str, ModelState]
    workers: dict[str, WorkerState]
    actors: list[dict[str, str]]
    work: dict[str, Backlog]  # model -> its work stream's backlog (group "workers")
    stages: dict[tuple[str, str], Backlog]  # (stream, group) -> backlog
    lengths: dict[str, int]  # stream -> XLEN
    counters: dict[str, float] = field(default_factory=dict)  # the calm:counters hash


async def read_snapshot(kb: KnowledgeBase) -> Snapshot:
    """Models, workers, actors, queue depths and counters in a few pipelined round trips."""
    names = kb.names
    models = await kb.models()
    workers = await kb.workers()
    actors = await kb.actors()
    pipe = kb.client.pipeline(transaction=False)
    for model in models:
        pipe.xinfo_groups(names.work(model))
    stage_streams = [_stream(names, s) for s in STAGE_STREAMS]
    for stream in stage_streams:
        pipe.xinfo_groups(stream)
    log_streams = [_stream(names, s) for s in (*STAGE_STREAMS, *LOG_STREAMS)]
    for stream in log_streams:
        pipe.xlen(stream)
    pipe.hgetall(names.counters)
    rows: list[Any] = await pipe.execute(raise_on_error=False)
    work = {m: _group_backlog(rows[i], names.GROUP_WORKERS) for i, m in enumerate(models)}
    offset = len(models)
    stages: dict[tuple[str, str], Backlog] = {}
    for j, stream in enumerate(stage_streams):
        for group in _groups(rows[offset + j]):
            stages[(stream, _s(group.get("name", "")))] = _backlog(group)
    offset += len(stage_streams)
    lengths = {s: int(rows[offset + k]) if isinstance(rows[offset + k], int) else 0 for k, s in enumerate(log_streams)}
    raw_counters = rows[-1] if isinstance(rows[-1], dict) else {}
    counters = {}
    for key, value in raw_counters.items():
        try:
            counters[_s(key)] = float(value)
        except ValueError:
            continue
    return Snapshot(time.time() * 1000, models, workers, actors, work, stages, lengths, counters)


def _stream(names: Names, short: str) -> str:
    return str(getattr(names, short))


def _groups(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        return []  # the stream does not exist yet
    return [{_s(k): v for k, v in g.items()} for g in raw if isinstance(g, dict)]


def _group_backlog(raw: Any, group: str) -> Backlog:
    for g in _groups(raw):
        if _s(g.get("name", "")) == group:
            return _backlog(g)
    return Backlog()


def _backlog(group: dict[str, Any]) -> Backlog:
    lag = group.get("lag")
    return Backlog(waiting=int(lag) if lag is not None else 0, pending=int(group.get("pending") or 0))


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
