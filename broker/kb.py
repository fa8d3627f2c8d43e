"""The knowledge base: Redis hashes with typed accessors (model cards + live QoS, workers, actors)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from broker.names import Names
from broker.scripts import LuaScript

CARD_FIELDS = ("description", "examples", "domains", "prompt_template", "params", "memory_mb", "source",
               "baseline", "quality", "eos_token", "max_context")
QOS_FIELDS = ("latency_ms", "queue_ms", "ms_per_token", "tokens_per_s", "energy_per_token_j", "energy_j",
              "confidence", "error_rate")

# EWMA update of several hash fields at once: KEYS[1] hash; ARGV[1] alpha, then field/value pairs.
# ARGV[2] now (ms) and ARGV[3] tau (ms): after a gap without samples the new sample weighs more
# (alpha_eff = max(alpha, 1 - exp(-gap / tau))), so a model that was idle is re-learned quickly. tau 0: plain.
_EWMA = LuaScript("""
local alpha = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local tau = tonumber(ARGV[3])
if tau > 0 then
  local last = tonumber(redis.call('HGET', KEYS[1], 'qos_at_ms'))
  if last then alpha = math.max(alpha, 1 - math.exp(-math.max(0, now - last) / tau)) end
  redis.call('HSET', KEYS[1], 'qos_at_ms', ARGV[2])
end
for i = 4, #ARGV, 2 do
  local f = ARGV[i]
  local x = tonumber(ARGV[i + 1])
  local old = tonumber(redis.call('HGET', KEYS[1], f))
  local new = x
  if old then new = old + alpha * (x - old) end
  redis.call('HSET', KEYS[1], f, tostring(new))
end
return 1
""")

# Add/remove a worker from a model's loaded set and mirror it into the model hash: KEYS[1] set, KEYS[2] hash.
_LOADED = LuaScript("""
if ARGV[2] == '1' then redis.call('SADD', KEYS[1], ARGV[1]) else redis.call('SREM', KEYS[1], ARGV[1]) end
local members = redis.call('SMEMBERS', KEYS[1])
table.sort(members)
redis.call('HSET', KEYS[2], 'loaded_on', table.concat(members, ','))
return #members
""")


QUALITY_SE_SUFFIX = "_se"  # a card's `<domain>.<metric>_se`: the standard error of that held-out mean


@dataclass(frozen=True, slots=True)
class ModelState:
    """A model card plus what the system has learned about the model so far."""

    name: str
    description: str = ""
    examples: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    prompt_template: str = "{prompt}"
    params: int = 0
    memory_mb: float = 0.0
    baseline: bool = False
    source: str = ""
    quality: dict[str, float] = field(default_factory=dict)  # held-out `<domain>.<metric>` (+ QUALITY_SE_SUFFIX)
    max_context: int = 0  # tokens the model can attend to (0: unknown)
    latency_ms: float | None = None
    queue_ms: float | None = None
    ms_per_token: float | None = None
    tokens_per_s: float | None = None
    energy_per_token_j: float | None = None
    energy_j: float | None = None
    confidence: float | None = None
    error_rate: float = 0.0
    requests: int = 0
    errors: int = 0
    load_s: float | None = None
    qos_at_ms: float | None = None  # when the last telemetry sample arrived
    learned: bytes | None = None  # float32 centroid of queries this model served well
    learned_n: int = 0
    loaded_on: tuple[str, ...] = ()
    profile_rows: int = 0  # rows of the routing profile at ``calm:profile:<name>``, set by the monitor
    profile_digest: str = ""  # what the profile was embedded from (changes when the card does)
    exemplars_digest: str = ""  # digest of the exemplar prompts at ``calm:exemplars:<name>``

    @property
    def domain(self) -> str:
        return self.domains[0] if self.domains else self.name


@dataclass(frozen=True, slots=True)
class WorkerState:
    """A worker as it registered itself, with its latest heartbeat."""

    id: str
    type: str = "onnx"
    device: str = "cpu"
    pid: int = 0
    host: str = ""
    memory_budget_mb: float = 0.0
    memory_used_mb: float = 0.0
    models_loaded: tuple[str, ...] = ()
    models_servable: tuple[str, ...] = ()
    heartbeat_ms: float = 0.0
    state: str = "up"
    inflight: int = 0
    last_used: dict[str, float] = field(default_factory=dict)  # model -> wall ms of its last request

    def alive(self, now_ms: float, timeout_s: float) -> bool:
        return self.state != "stopped" and now_ms - self.heartbeat_ms <= timeout_s * 1000


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    """Registered models and workers, their work streams' backlogs and the classifier's digest, read together."""

    model_names: tuple[str, ...] = ()  # every registered name (a model whose hash is gone is not in `models`)
    worker_ids: tuple[str, ...] = ()
    models: dict[str, ModelState] = field(default_factory=dict)
    workers: dict[str, WorkerState] = field(default_factory=dict)
    backlogs: dict[str, int] = field(default_factory=dict)  # per model: entries waiting or in flight for workers
    classifier_digest: str = ""


class KnowledgeBase:
    """Typed reads and pipelined writes of CALM's shared knowledge."""

    def __init__(self, client: aioredis.Redis, names: Names) -> None:
        self.client = client
        self.names = names

    # -- models --------------------------------------------------------------------
    def card_mapping(self, card: Mapping[str, Any]) -> dict[str, str]:
        """Hash fields for a model card (lists and dicts as JSON)."""
        out: dict[str, str] = {}
        for key in CARD_FIELDS:
            if key not in card or card[key] is None:
                continue
            value = card[key]
            if isinstance(value, (list, tuple, dict)):
                out[key] = json.dumps(list(value) if isinstance(value, tuple) else value)
            elif isinstance(value, bool):
                out[key] = "1" if value else "0"
            else:
                out[key] = str(value)
        return out

    def register_model(self, pipe: Pipeline, name: str, card: Mapping[str, Any]) -> None:
        """Queue writes that add or refresh a model card (live QoS is kept).

        ``card["exemplars"]`` (prompts typical of the model's training data) is kept beside the hash,
        at ``calm:exemplars:<name>``, so that reading the fleet stays cheap.
        """
        fields: dict[Any, Any] = {"name": name, **self.card_mapping(card)}
        exemplars = [str(x) for x in card.get("exemplars") or ()]
        blob = json.dumps(exemplars, ensure_ascii=False)
        fields["exemplars_digest"] = hashlib.sha256(blob.encode()).hexdigest()[:16] if exemplars else ""
        if exemplars:
            pipe.set(self.names.exemplars(name), blob)
        else:
            pipe.delete(self.names.exemplars(name))
        pipe.hset(self.names.model(name), mapping=fields)
        pipe.sadd(self.names.models, name)
        pipe.incr(self.names.kb_version)

    async def exemplars(self, name: str) -> list[str]:
        """The exemplar prompts the model's worker registered (empty when none)."""
        raw = await self.client.get(self.names.exemplars(name))
        try:
            rows = json.loads(raw) if raw else []
        except ValueError:
            return []
        return [str(x) for x in rows] if isinstance(rows, list) else []

    def set_profile(self, pipe: Pipeline, name: str, profile: bytes, rows: int, digest: str) -> None:
        """Queue the write of a model's routing profile (``rows`` float32 embeddings) made from ``digest``."""
        pipe.set(self.names.profile(name), profile)
        pipe.hset(self.names.model(name), mapping={"profile_rows": rows, "profile_digest": digest})
        pipe.incr(self.names.kb_version)

    async def profiles(self, names: Sequence[str]) -> dict[str, bytes]:
        """The routing profiles of ``names`` (models without one are left out), in one round trip."""
        if not names:
            return {}
        rows = await self.client.mget([self.names.profile(n) for n in names])
        return {n: raw for n, raw in zip(names, rows, strict=True) if isinstance(raw, bytes) and raw}

    def set_classifier(self, pipe: Pipeline, digest: str, models: Sequence[str], blob: bytes, now_ms: float) -> None:
        """Queue the write of the fleet's domain classifier (an opaque ``blob``) trained from ``digest``."""
        pipe.hset(self.names.classifier, mapping={"digest": digest, "models": json.dumps(list(models)),
                                                  "blob": blob, "trained_at_ms": int(now_ms)})
        pipe.incr(self.names.kb_version)

    async def classifier_digest(self) -> str:
        """The digest of the stored domain classifier ('' when there is none)."""
        raw = await self.client.hget(self.names.classifier, "digest")
        return _s(raw) if raw else ""

    async def classifier_models(self) -> list[str]:
        """The models the stored domain classifier tells apart ([] when there is none)."""
        raw = await self.client.hget(self.names.classifier, "models")
        return [str(m) for m in json.loads(_s(raw))] if raw else []

    async def classifier(self) -> tuple[str, bytes] | None:
        """The stored domain classifier as (digest, blob), or None."""
        digest, blob = await self.client.hmget(self.names.classifier, ["digest", "blob"])
        if not digest or not isinstance(blob, bytes) or not blob:
            return None
        return _s(digest), blob

    def record_qos(self, pipe: Pipeline, name: str, alpha: float, values: Mapping[str, float], ok: bool,
                   window: int, now_ms: float | None = None, stale_tau_s: float = 0.0) -> None:
        """Queue an EWMA update of the model's QoS fields plus its windows of recent values.

        With ``stale_tau_s`` > 0 a sample that follows a long gap weighs more (see the Lua script).
        """
        stamp = time.time() * 1000 if now_ms is None else now_ms
        args: list[Any] = [alpha, f"{stamp:.0f}", f"{stale_tau_s * 1000:.0f}"]
        for key, value in values.items():
            args += [key, float(value)]
        _EWMA.queue(pipe, [self.names.model(name)], args)
        pipe.hincrby(self.names.model(name), "requests", 1)
        if not ok:
            pipe.hincrby(self.names.model(name), "errors", 1)
        for key in ("latency_ms", "energy_j", "confidence"):
            if key in values:
                wkey = self.names.window(name, key)
                pipe.lpush(wkey, f"{values[key]:.4f}")
                pipe.ltrim(wkey, 0, window - 1)

    def set_load_time(self, pipe: Pipeline, name: str, load_s: float, alpha: float) -> None:
        _EWMA.queue(pipe, [self.names.model(name)], [alpha, 0, 0, "load_s", load_s])

    def set_loaded(self, pipe: Pipeline, model: str, worker: str, loaded: bool) -> None:
        _LOADED.queue(pipe, [f"{self.names.model(model)}:loaded", self.names.model(model)],
                      [worker, "1" if loaded else "0"])
        pipe.incr(self.names.kb_version)

    async def model_names(self) -> list[str]:
        return sorted(_s(n) for n in await self.client.smembers(self.names.models))

    async def models(self) -> dict[str, ModelState]:
        """Every registered model, in one pipelined round trip after the name lookup."""
        names = await self.model_names()
        if not names:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.names.model(name))
        rows = await pipe.execute()
        return {name: _model_state(name, row) for name, row in zip(names, rows, strict=True) if row}

    async def version(self) -> int:
        raw = await self.client.get(self.names.kb_version)
        return int(raw or 0)

    # -- workers -------------------------------------------------------------------
    def register_worker(self, pipe: Pipeline, worker: WorkerState, ttl_s: float) -> None:
        pipe.hset(self.names.worker(worker.id), mapping=dict[Any, Any](_worker_mapping(worker)))
        pipe.sadd(self.names.workers, worker.id)
        pipe.set(self.names.worker_alive(worker.id), "1", px=int(ttl_s * 1000))
        pipe.incr(self.names.kb_version)

    def heartbeat(self, pipe: Pipeline, worker_id: str, ttl_s: float, **fields: Any) -> None:
        mapping: dict[Any, Any] = {"heartbeat_ms": f"{time.time() * 1000:.0f}"}
        for key, value in fields.items():
            if isinstance(value, (list, tuple)):
                mapping[key] = json.dumps(list(value))
            elif isinstance(value, dict):
                mapping[key] = json.dumps(value)
            else:
                mapping[key] = str(value)
        pipe.hset(self.names.worker(worker_id), mapping=mapping)
        pipe.set(self.names.worker_alive(worker_id), "1", px=int(ttl_s * 1000))

    def remove_worker(self, pipe: Pipeline, worker_id: str, models: Iterable[str]) -> None:
        for model in models:
            self.set_loaded(pipe, model, worker_id, False)
        pipe.srem(self.names.workers, worker_id)
        pipe.delete(self.names.worker(worker_id), self.names.worker_alive(worker_id))
        pipe.incr(self.names.kb_version)

    async def workers(self) -> dict[str, WorkerState]:
        ids = sorted(_s(i) for i in await self.client.smembers(self.names.workers))
        if not ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hgetall(self.names.worker(worker_id))
        rows = await pipe.execute()
        return {wid: _worker_state(wid, row) for wid, row in zip(ids, rows, strict=True) if row}

    # -- the fleet at once -----------------------------------------------------------
    async def snapshot(self, previous: FleetSnapshot | None = None) -> FleetSnapshot:
        """Models, workers, backlogs and the classifier's digest in one pipelined round trip.

        The reads are those of `previous`'s models and workers, with both sets' members: when the sets
        have changed since, a second round trip reads the new ones.
        """
        model_names, worker_ids = (previous.model_names, previous.worker_ids) if previous else ((), ())
        for _ in range(2):
            pipe = self.client.pipeline(transaction=False)
            pipe.smembers(self.names.models)
            pipe.smembers(self.names.workers)
            pipe.hget(self.names.classifier, "digest")
            for name in model_names:
                pipe.hgetall(self.names.model(name))
                pipe.xinfo_groups(self.names.work(name))
            for worker_id in worker_ids:
                pipe.hgetall(self.names.worker(worker_id))
            rows: list[Any] = await pipe.execute(raise_on_error=False)
            registered = tuple(sorted(_s(n) for n in _ok(rows[0], set())))
            joined = tuple(sorted(_s(i) for i in _ok(rows[1], set())))
            if (registered, joined) == (model_names, worker_ids):
                break
            model_names, worker_ids = registered, joined
        # after two reads of changing sets, the second read's rows stand for the names it asked about
        model_rows, worker_rows = rows[3 : 3 + 2 * len(model_names)], rows[3 + 2 * len(model_names) :]
        models: dict[str, ModelState] = {}
        backlogs: dict[str, int] = {}
        for i, name in enumerate(model_names):
            row, backlog = _ok(model_rows[2 * i], {}), self._backlog(model_rows[2 * i + 1])
            if row:
                models[name] = _model_state(name, row)
            if backlog is not None:
                backlogs[name] = backlog
        workers = {wid: _worker_state(wid, row) for wid, raw in zip(worker_ids, worker_rows, strict=True)
                   if (row := _ok(raw, {}))}
        digest = _ok(rows[2], None)
        return FleetSnapshot(model_names, worker_ids, models, workers, backlogs, _s(digest) if digest else "")

    def _backlog(self, groups: Any) -> int | None:
        """Pending plus lag of the workers' group, from an XINFO GROUPS result (None: no such group)."""
        for group in _ok(groups, []):
            if _s(group.get("name")) == self.names.GROUP_WORKERS:
                return int(group.get("pending") or 0) + int(group.get("lag") or 0)
        return None

    # -- actors --------------------------------------------------------------------
    def actor_heartbeat(self, pipe: Pipeline, role: str, instance: str, pid: int, ttl_s: float,
                        **extra: Any) -> None:
        key = self.names.actor(role, instance)
        pipe.hset(key, mapping={"role": role, "instance": instance, "pid": pid,
                                "heartbeat_ms": f"{time.time() * 1000:.0f}", **{k: str(v) for k, v in extra.items()}})
        pipe.pexpire(key, int(ttl_s * 1000))
        pipe.sadd(self.names.actors, f"{role}:{instance}")

    async def actors(self) -> list[dict[str, str]]:
        members = sorted(_s(m) for m in await self.client.smembers(self.names.actors))
        pipe = self.client.pipeline(transaction=False)
        for member in members:
            role, _, instance = member.partition(":")
            pipe.hgetall(self.names.actor(role, instance))
        rows = await pipe.execute()
        out = []
        stale = []
        for member, row in zip(members, rows, strict=True):
            if row:
                out.append({_s(k): _s(v) for k, v in row.items()})
            else:
                stale.append(member)
        if stale:
            await self.client.srem(self.names.actors, *stale)
        return out

    # -- demand --------------------------------------------------------------------
    def record_demand(self, pipe: Pipeline, model: str, now_s: float, bucket_s: float = 10, keep_s: int = 3600,
                      domain: str = "") -> None:
        """Count one query for ``model`` (and for its topic ``domain``) in the bucket ``now_s // bucket_s``."""
        bucket = str(int(now_s // bucket_s))
        keys = [self.names.demand(model)] + ([self.names.domain_demand(domain)] if domain else [])
        for key in keys:
            pipe.hincrby(key, bucket, 1)
            pipe.expire(key, keep_s)

    async def demand(self, models: Iterable[str]) -> dict[str, dict[int, int]]:
        return (await self.demand_and_domains(models, ()))[0]

    async def domain_demand(self, domains: Iterable[str]) -> dict[str, dict[int, int]]:
        return (await self.demand_and_domains((), domains))[1]

    async def demand_and_domains(self, models: Iterable[str], domains: Iterable[str]
                                 ) -> tuple[dict[str, dict[int, int]], dict[str, dict[int, int]]]:
        """Buckets per model and per domain (a model and a domain may share a name), in one round trip."""
        models, domains = list(models), list(domains)
        pipe = self.client.pipeline(transaction=False)
        for key in [self.names.demand(m) for m in models] + [self.names.domain_demand(d) for d in domains]:
            pipe.hgetall(key)
        rows = [{int(k): int(v) for k, v in row.items()} for row in await pipe.execute()]
        return dict(zip(models, rows[:len(models)], strict=True)), dict(zip(domains, rows[len(models):], strict=True))


def _ok(result: Any, default: Any) -> Any:
    """A pipelined command's result, or `default` where it failed (e.g. XINFO of a stream not created yet)."""
    return default if isinstance(result, Exception) else result


def _s(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _f(row: Mapping[bytes, bytes], key: str) -> float | None:
    raw = row.get(key.encode())
    if raw is None or raw == b"":
        return None
    try:
        return float(raw)
    except ValueError:
        return None


def _json(row: Mapping[bytes, bytes], key: str, default: Any) -> Any:
    raw = row.get(key.encode())
    if not raw:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        return default


def _model_state(name: str, row: Mapping[bytes, bytes]) -> ModelState:
    loaded = _s(row.get(b"loaded_on", b""))
    requests = int(_f(row, "requests") or 0)
    return ModelState(
        name=name,
        description=_s(row.get(b"description", b"")),
        examples=tuple(_json(row, "examples", [])),
        domains=tuple(_json(row, "domains", [])),
        prompt_template=_s(row.get(b"prompt_template", b"{prompt}")),
        params=int(_f(row, "params") or 0),
        memory_mb=_f(row, "memory_mb") or 0.0,
        baseline=row.get(b"baseline") in (b"1", b"true", b"True"),
        source=_s(row.get(b"source", b"")),
        quality=dict(_json(row, "quality", {})),
        max_context=int(_f(row, "max_context") or 0),
        latency_ms=_f(row, "latency_ms"),
        queue_ms=_f(row, "queue_ms"),
        ms_per_token=_f(row, "ms_per_token"),
        tokens_per_s=_f(row, "tokens_per_s"),
        energy_per_token_j=_f(row, "energy_per_token_j"),
        energy_j=_f(row, "energy_j"),
        confidence=_f(row, "confidence"),
        error_rate=_f(row, "error_rate") or 0.0,
        requests=requests,
        errors=int(_f(row, "errors") or 0),
        load_s=_f(row, "load_s"),
        qos_at_ms=_f(row, "qos_at_ms"),
        learned=row.get(b"learned"),
        learned_n=int(_f(row, "learned_n") or 0),
        loaded_on=tuple(w for w in loaded.split(",") if w),
        profile_rows=int(_f(row, "profile_rows") or 0),
        profile_digest=_s(row.get(b"profile_digest", b"")),
        exemplars_digest=_s(row.get(b"exemplars_digest", b"")),
    )


def _worker_mapping(worker: WorkerState) -> dict[str, str]:
    return {
        "id": worker.id, "type": worker.type, "device": worker.device, "pid": str(worker.pid), "host": worker.host,
        "memory_budget_mb": f"{worker.memory_budget_mb:.1f}", "memory_used_mb": f"{worker.memory_used_mb:.1f}",
        "models_loaded": json.dumps(list(worker.models_loaded)),
        "models_servable": json.dumps(list(worker.models_servable)),
        "heartbeat_ms": f"{worker.heartbeat_ms or time.time() * 1000:.0f}", "state": worker.state,
        "inflight": str(worker.inflight),
    }


def _worker_state(worker_id: str, row: Mapping[bytes, bytes]) -> WorkerState:
    return WorkerState(
        id=worker_id,
        type=_s(row.get(b"type", b"onnx")),
        device=_s(row.get(b"device", b"cpu")),
        pid=int(_f(row, "pid") or 0),
        host=_s(row.get(b"host", b"")),
        memory_budget_mb=_f(row, "memory_budget_mb") or 0.0,
        memory_used_mb=_f(row, "memory_used_mb") or 0.0,
        models_loaded=tuple(_json(row, "models_loaded", [])),
        models_servable=tuple(_json(row, "models_servable", [])),
        heartbeat_ms=_f(row, "heartbeat_ms") or 0.0,
        state=_s(row.get(b"state", b"up")),
        inflight=int(_f(row, "inflight") or 0),
        last_used={str(k): float(v) for k, v in dict(_json(row, "last_used", {})).items()},
    )
