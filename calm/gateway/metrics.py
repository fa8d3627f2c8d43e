"""Prometheus metrics: the gateway's own, plus the system's as read from the KB and the event streams.

Three sources, all served on the gateway's ``/metrics`` (actors and workers open no port of their own):

* ``calm_gateway_*`` are counted by this gateway process for the requests it serves.
* ``calm_model_*``, ``calm_worker_*``, ``calm_actor_*``, ``calm_work_queue_*``, ``calm_stage_backlog``,
  ``calm_stream_length``, ``calm_cache_hits_total`` and ``calm_events_total`` are read from the knowledge
  base and the streams at each scrape (what actors and workers wrote there: QoS EWMAs, heartbeats,
  loaded models, XINFO, the ``calm:counters`` hash).
* ``calm_inferences_total``, ``calm_energy_joules_total``, ``calm_tokens_total``, ``calm_model_loads_total``,
  ``calm_model_evictions_total``, ``calm_dead_letters_total`` and ``calm_route_decisions_total`` count the
  entries of ``calm:results``, ``calm:sched``, ``calm:dead`` and ``calm:decisions`` seen since this
  gateway started (system-wide: every gateway replica reports the same totals).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from redis.exceptions import RedisError

from broker.kb import KnowledgeBase
from calm.gateway.events import EventCounts
from calm.gateway.snapshot import Snapshot, read_snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROUTE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
CACHE_HIT_PREFIX = "cache_hits_"  # the executor counts hits as calm:counters cache_hits_<kind>
ROLES = ("monitor", "analyzer", "planner", "executor", "scheduler")  # calm.roles.ROLES, without importing onnxruntime


class GatewayMetrics:
    """What this gateway counts itself, registered on its own registry (one per app)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("calm_gateway_requests", "HTTP API requests by endpoint, requested model, status",
                                ["endpoint", "model", "code"], registry=registry)
        self.replies = Counter("calm_gateway_replies", "Replies received by the gateway, by answering model and status",
                               ["model", "status"], registry=registry)
        self.latency = Histogram("calm_gateway_reply_latency_seconds",
                                 "Reply latency_ms (ingress entry to reply) of the gateway's queries",
                                 ["model"], buckets=LATENCY_BUCKETS_S, registry=registry)
        self.route = Histogram("calm_gateway_route_seconds", "Reply route_ms (monitor to dispatch) of its queries",
                               ["model"], buckets=ROUTE_BUCKETS_S, registry=registry)
        self.http = Histogram("calm_gateway_request_seconds", "HTTP request time at the gateway, by endpoint",
                              ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=registry)
        self.cache_hits = Counter("calm_gateway_cache_hits", "Cached replies the gateway received, by cache kind",
                                  ["kind"], registry=registry)
        self.inflight = Gauge("calm_gateway_inflight", "Queries the gateway waits for now", registry=registry)

    def observe_reply(self, reply: Mapping[str, str]) -> None:
        model = reply.get("model") or "-"
        self.replies.labels(model, reply.get("status", "?")).inc()
        if reply.get("status") != "ok":
            return
        for histogram, key in ((self.latency, "latency_ms"), (self.route, "route_ms")):
            value = _float(reply.get(key))
            if value is not None:
                histogram.labels(model).observe(value / 1000)
        if reply.get("cached") == "1":
            self.cache_hits.labels(reply.get("cache") or "unknown").inc()


class SystemCollector:
    """Builds the system's metric families from the latest snapshot and the event counts, at scrape time."""

    def __init__(self, counts: EventCounts, worker_timeout_s: float) -> None:
        self.counts = counts
        self.worker_timeout_s = worker_timeout_s
        self.snapshot: Snapshot | None = None
        self.kb_up = False

    def describe(self) -> Iterable[Metric]:
        return []  # families vary with the fleet: nothing to describe ahead of a scrape

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("calm_kb_up", "1 when the last scrape could read the knowledge base")
        up.add_metric([], 1.0 if self.kb_up else 0.0)
        yield up
        if self.snapshot is not None:
            yield from _kb_families(self.snapshot, self.worker_timeout_s)
        yield from _event_families(self.counts)


def _kb_families(s: Snapshot, worker_timeout_s: float) -> Iterable[Metric]:
    m_requests = CounterMetricFamily("calm_model_requests", "Requests served per model (KB: monitor)", labels=["model"])
    m_errors = CounterMetricFamily("calm_model_errors", "Failed requests per model (KB: monitor)", labels=["model"])
    gauges = {
        "latency_ms": ("calm_model_latency_ewma_seconds", "EWMA of service latency per model (KB)", 1e-3),
        "tokens_per_s": ("calm_model_tokens_per_second", "EWMA of generation speed per model (KB)", 1.0),
        "energy_per_token_j": ("calm_model_energy_per_token_joules", "EWMA of energy per token (KB)", 1.0),
        "confidence": ("calm_model_confidence", "EWMA of mean token probability per model (KB)", 1.0),
        "error_rate": ("calm_model_error_rate", "EWMA of the error rate per model (KB)", 1.0),
        "load_s": ("calm_model_load_seconds", "EWMA of the time to load a model (KB)", 1.0),
    }
    families = {key: GaugeMetricFamily(name, doc, labels=["model"]) for key, (name, doc, _) in gauges.items()}
    replicas = GaugeMetricFamily("calm_model_replicas", "Workers that have the model loaded (KB)", labels=["model"])
    loaded = GaugeMetricFamily("calm_model_loaded", "1 for each worker a model is loaded on (KB)",
                               labels=["model", "worker"])
    depth = GaugeMetricFamily("calm_work_queue_depth", "Entries waiting or in flight on calm:work:<model>",
                              labels=["model"])
    pending = GaugeMetricFamily("calm_work_queue_pending", "Entries delivered to a worker and not yet done",
                                labels=["model"])
    for name, model in s.models.items():
        m_requests.add_metric([name], model.requests)
        m_errors.add_metric([name], model.errors)
        for key, (_, _, scale) in gauges.items():
            value = getattr(model, key)
            if value is not None:
                families[key].add_metric([name], float(value) * scale)
        replicas.add_metric([name], len(model.loaded_on))
        for worker in model.loaded_on:
            loaded.add_metric([name, worker], 1.0)
        backlog = s.work.get(name)
        depth.add_metric([name], backlog.depth if backlog else 0)
        pending.add_metric([name], backlog.pending if backlog else 0)
    yield from (m_requests, m_errors, *families.values(), replicas, loaded, depth, pending)
    yield from _worker_families(s, worker_timeout_s)
    stages = GaugeMetricFamily("calm_stage_backlog", "Entries waiting or pending per pipeline stream and group",
                               labels=["stream", "group"])
    for (stream, group), backlog in sorted(s.stages.items()):
        stages.add_metric([stream, group], backlog.depth)
    lengths = GaugeMetricFamily("calm_stream_length", "Entries kept in each stream (XLEN)", labels=["stream"])
    for stream, length in sorted(s.lengths.items()):
        lengths.add_metric([stream], length)
    hits = CounterMetricFamily("calm_cache_hits", "Replies served from the response cache, by kind (calm:counters)",
                               labels=["kind"])
    events = CounterMetricFamily("calm_events", "Other counters components keep in the calm:counters hash",
                                 labels=["event"])
    for event, value in sorted(s.counters.items()):
        if event.startswith(CACHE_HIT_PREFIX):
            hits.add_metric([event.removeprefix(CACHE_HIT_PREFIX)], value)
        else:
            events.add_metric([event], value)
    yield from (stages, lengths, hits, events)


def _worker_families(s: Snapshot, worker_timeout_s: float) -> Iterable[Metric]:
    now_ms = time.time() * 1000
    up = GaugeMetricFamily("calm_worker_up", "1 while a worker heartbeats (KB)", labels=["worker", "device", "type"])
    age = GaugeMetricFamily("calm_worker_heartbeat_age_seconds", "Seconds since a worker's last heartbeat",
                            labels=["worker"])
    count = GaugeMetricFamily("calm_worker_models_loaded", "Models loaded per worker", labels=["worker"])
    used = GaugeMetricFamily("calm_worker_memory_used_bytes", "Memory used by loaded models", labels=["worker"])
    budget = GaugeMetricFamily("calm_worker_memory_budget_bytes", "Memory budget of a worker", labels=["worker"])
    inflight = GaugeMetricFamily("calm_worker_inflight", "Generations running on a worker", labels=["worker"])
    for wid, w in s.workers.items():
        alive = w.alive(now_ms, worker_timeout_s)
        up.add_metric([wid, w.device, w.type], 1.0 if alive else 0.0)
        age.add_metric([wid], max(0.0, (now_ms - w.heartbeat_ms) / 1000))
        count.add_metric([wid], len(w.models_loaded))
        used.add_metric([wid], w.memory_used_mb * 2**20)
        budget.add_metric([wid], w.memory_budget_mb * 2**20)
        inflight.add_metric([wid], w.inflight)
    actor_up = GaugeMetricFamily("calm_actor_up", "1 for each actor instance whose heartbeat is current",
                                 labels=["role", "instance"])
    instances = GaugeMetricFamily("calm_actor_instances", "Live instances per MAPE-K role", labels=["role"])
    per_role: dict[str, int] = dict.fromkeys(ROLES, 0)
    for actor in s.actors:
        role = actor.get("role", "?")
        actor_up.add_metric([role, actor.get("instance", "?")], 1.0)
        per_role[role] = per_role.get(role, 0) + 1
    for role, n in sorted(per_role.items()):
        instances.add_metric([role], n)
    yield from (up, age, count, used, budget, inflight, actor_up, instances)


def _event_families(c: EventCounts) -> Iterable[Metric]:
    inferences = CounterMetricFamily("calm_inferences", "Inference results since the gateway started (calm:results)",
                                     labels=["model", "worker", "ok"])
    for (model, worker, ok), n in sorted(c.inferences.items()):
        inferences.add_metric([model, worker, ok], n)
    energy = CounterMetricFamily("calm_energy_joules", "Energy of inference by model and meter (calm:results)",
                                 labels=["model", "source"])
    for (model, source), joules in sorted(c.energy_j.items()):
        energy.add_metric([model, source], joules)
    tokens = CounterMetricFamily("calm_tokens", "Prompt (in) and generated (out) tokens (calm:results)",
                                 labels=["model", "direction"])
    for (model, direction), n in sorted(c.tokens.items()):
        tokens.add_metric([model, direction], n)
    loads = CounterMetricFamily("calm_model_loads", "Model loads by workers (calm:sched)", labels=["model", "worker"])
    evictions = CounterMetricFamily("calm_model_evictions", "Model evictions (calm:sched)", labels=["model", "worker"])
    failures = CounterMetricFamily("calm_model_load_failures", "Failed loads (calm:sched)", labels=["model", "worker"])
    by_event = {"loaded": loads, "evicted": evictions, "load_failed": failures}
    for (event, model, worker), n in sorted(c.worker_events.items()):
        if event in by_event:
            by_event[event].add_metric([model, worker], n)
    dead = CounterMetricFamily("calm_dead_letters", "Dead letters by actor and reason (calm:dead)",
                               labels=["actor", "reason"])
    for (actor, reason), n in sorted(c.dead.items()):
        dead.add_metric([actor, reason], n)
    decisions = CounterMetricFamily("calm_route_decisions", "Routing decisions by model and domain (calm:decisions)",
                                    labels=["model", "domain"])
    for (model, domain), n in sorted(c.decisions.items()):
        decisions.add_metric([model, domain], n)
    yield from (inferences, energy, tokens, loads, evictions, failures, dead, decisions)


class MetricsEndpoint:
    """Renders ``/metrics``: one KB snapshot per scrape (scrapes are serialised), then the text format."""

    def __init__(self, kb: KnowledgeBase, counts: EventCounts, worker_timeout_s: float) -> None:
        self.kb = kb
        self.registry = CollectorRegistry(auto_describe=False)
        self.gateway = GatewayMetrics(self.registry)
        self.system = SystemCollector(counts, worker_timeout_s)
        self.registry.register(self.system)
        ProcessCollector(registry=self.registry)
        self._lock = asyncio.Lock()

    async def render(self) -> bytes:
        async with self._lock:
            try:
                self.system.snapshot = await read_snapshot(self.kb)
                self.system.kb_up = True
            except (RedisError, OSError):
                self.system.kb_up = False
            return generate_latest(self.registry)


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None
