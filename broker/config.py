"""The one configuration object: defaults, then a TOML file, then ``CALM_*`` variables, then flags.

Each concern has its own frozen dataclass; :class:`Settings` composes them. Only
:func:`load_settings` reads the environment; everything else receives a ``Settings``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.errors import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str | None = None  # None: try DEFAULT_REDIS_URL, then an embedded Valkey
    prefix: str = "calm:"
    embedded: bool = True  # allow starting an embedded Valkey when nothing answers
    connect_timeout_s: float = 2.0
    retry_attempts: int = 8
    retry_backoff_cap_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.prefix or any(c.isspace() for c in self.prefix):
            raise ConfigError(f"redis.prefix must be non-empty without spaces, got {self.prefix!r}")


@dataclass(frozen=True, slots=True)
class StreamSettings:
    block_ms: int = 1000
    batch: int = 64
    maxlen: int = 100_000  # approximate MAXLEN for internal streams
    replies_maxlen: int = 100_000
    dead_maxlen: int = 10_000
    decisions_maxlen: int = 10_000
    reclaim_idle_ms: int = 15_000
    reclaim_interval_ms: int = 2_000
    max_deliveries: int = 5
    concurrency: int = 64  # handlers in flight per consumer
    retain_acked_s: float = 300.0  # acknowledged entries of consumed streams are trimmed after this (0: never)

    def __post_init__(self) -> None:
        for name in ("block_ms", "batch", "maxlen", "reclaim_idle_ms", "max_deliveries", "concurrency"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"streams.{name} must be > 0")


@dataclass(frozen=True, slots=True)
class IngressSettings:
    max_prompt_bytes: int = 32 * 1024
    default_max_new_tokens: int = 64
    max_new_tokens_limit: int = 1024
    dedup_window_s: int = 3600
    embed_batch: int = 32
    # The router embeds a prompt's first N tokens ([CLS] and [SEP] included): the embedder's cost grows with
    # every token and a prompt's opening says its domain. The semantic cache only serves prompts that fit.
    embed_tokens: int = 16

    def __post_init__(self) -> None:
        if not 3 <= self.embed_tokens <= 512:
            raise ConfigError(f"ingress.embed_tokens must be 3-512, got {self.embed_tokens}")


@dataclass(frozen=True, slots=True)
class PlannerSettings:
    strategy: str = "utility"
    w_fit: float = 1.0
    w_quality: float = 0.3
    w_latency: float = 0.25
    w_energy: float = 0.1
    w_errors: float = 1.0
    cold_load_penalty: float = 0.05
    latency_scale_ms: float = 1000.0  # latency normalisation: utility loses w_latency per scale
    energy_scale_j: float = 1.0
    explore_interval_s: float = 10.0  # probe a near-best model whose QoS is older than this, once per interval
    explore_margin: float = 0.2  # only models whose utility is within this of the best are probed
    route_to_baseline: bool = False  # let automatic routing choose models marked baseline
    # Held-out quality floor: automatic routing leaves out a model whose card's held-out quality on the
    # query's domain is below the best card's there by more than this fraction plus two standard errors
    # (baselines included: one better than every specialist gets the domain's queries). 1 turns it off.
    quality_tolerance: float = 0.0
    fit_temperature: float = 0.2  # softmax temperature turning cosine fits into shares (0: raw cosine)
    classifier_weight: float = 0.7  # share of a specialist's fit given by the domain classifier (0: cosine only)
    classifier_temperature: float = 0.1  # softmax temperature over the classifier's scores
    classifier_ridge: float = 0.5  # ridge penalty when the monitor trains the classifier
    # The analyzer's scan of every profile row runs on the rows' first principal axes, then scores each
    # model's nearest candidates exactly (read at start; 0: one exact pass over every row). See the README.
    profile_rank: int = 128
    max_queue_per_model: int = 256  # backpressure: a model with this much work waiting takes no more

    def __post_init__(self) -> None:
        if not 0.0 <= self.quality_tolerance <= 1.0:
            raise ConfigError(f"planner.quality_tolerance must be within [0, 1], got {self.quality_tolerance}")
        if self.profile_rank < 0:
            raise ConfigError(f"planner.profile_rank must be 0 (exact) or a positive rank, got {self.profile_rank}")


@dataclass(frozen=True, slots=True)
class ExecutorSettings:
    attempt_timeout_s: float = 60.0
    max_attempts: int = 3
    sweep_interval_ms: int = 500
    # Workers deliver a successful query's reply themselves (one stream hop less in its latency); the executor
    # still finishes the query on the result (cache, in-flight record) and its own delivery is then a no-op.
    worker_replies: bool = True


@dataclass(frozen=True, slots=True)
class CacheSettings:
    exact: bool = True
    semantic: bool = True
    greedy_only: bool = True  # sampled replies (temperature > 0) are not reused
    exact_ttl_s: int = 3600
    semantic_ttl_s: int = 3600
    semantic_threshold: float = 0.95  # cosine; per-domain overrides below
    domain_thresholds: str = "arithmetic=0.97,sorting=0.97,code=0.96,prose=0.93"
    max_entries_per_domain: int = 2000
    max_exact_entries: int = 100_000

    def threshold(self, domain: str) -> float:
        for part in self.domain_thresholds.split(","):
            name, _, value = part.partition("=")
            if name.strip() == domain and value.strip():
                return float(value)
        return self.semantic_threshold


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    policy: str = "lru"  # lru | demand60 | static | forecast
    interval_ms: int = 1000
    react_ms: int = 20  # a model loaded for waiting queries: plan again this soon after they are served
    worker_timeout_s: float = 10.0  # missed heartbeats for this long: worker removed
    bucket_s: float = 10.0  # demand is counted per model (and per domain) in buckets this long
    window_s: float = 60.0  # demand60: evict the model with the fewest requests in this window
    forecaster: str = "holt"  # holt (double exponential smoothing) | seasonal (additive Holt-Winters)
    alpha: float = 0.3  # level smoothing
    beta: float = 0.02  # trend smoothing (counts per bucket are noisy: keep it small)
    gamma: float = 0.3  # seasonal smoothing
    season_s: float = 0.0  # seasonal: cycle length (0: behaves as holt)
    horizon_s: float = 20.0  # forecast: plan for the demand expected over this horizon
    hysteresis: float = 0.5  # a resident model keeps its place unless a rival scores (1 + this) times more
    min_residency_s: float = 30.0  # a model the plan prefetched stays at least this long
    prefetch_min_requests: float = 0.5  # prefetch only models expected to get this many requests in the horizon
    max_replicas: int = 2  # copies of one model the plan may spread over workers when one cannot keep up
    change_p: float = 0.003  # forecast: counts this unlikely (Poisson) under the forecast restart its level (0: never)
    quiet_discount: float = 1.0  # forecast: to evict, a model q nats quieter than forecast counts exp(-this*q) as much
    static_models: tuple[str, ...] = ()  # static: the models to keep (empty: the most demanded so far)

    def __post_init__(self) -> None:
        if self.policy not in ("lru", "demand60", "static", "forecast"):
            raise ConfigError(f"scheduler.policy must be lru, demand60, static or forecast, got {self.policy!r}")
        if self.forecaster not in ("holt", "seasonal"):
            raise ConfigError(f"scheduler.forecaster must be holt or seasonal, got {self.forecaster!r}")
        for name in ("alpha", "beta", "gamma"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"scheduler.{name} must be within [0, 1]")
        for name in ("interval_ms", "react_ms", "bucket_s", "window_s", "horizon_s", "max_replicas"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"scheduler.{name} must be > 0")
        for name in ("season_s", "hysteresis", "min_residency_s", "prefetch_min_requests", "quiet_discount"):
            if getattr(self, name) < 0:
                raise ConfigError(f"scheduler.{name} must be >= 0")
        if not 0.0 <= self.change_p < 1.0:
            raise ConfigError("scheduler.change_p must be within [0, 1) (0: no change detection)")


@dataclass(frozen=True, slots=True)
class QoSSettings:
    ewma_alpha: float = 0.2
    window: int = 100
    stale_tau_s: float = 10.0  # a sample after this long a gap counts ~63 % (re-learn idle models fast)
    learn_min_confidence: float = 0.6  # replies at least this confident teach the model's learned centroid
    learn_flush_s: float = 2.0


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    worker_id: str | None = None
    models: tuple[str, ...] = ()  # empty: every model of the fleet may be loaded
    preload: tuple[str, ...] = ()
    memory_mb: int = 2048
    device: str = "cpu"  # cpu | cuda | auto
    intra_op_threads: int = 1
    shared_kv: bool = True  # GroupQueryAttention graphs on CPU keep their KV cache in place (no copy a step)
    watts_per_core: float = 15.0
    gpu_index: int = 0
    heartbeat_s: float = 1.0
    inject_delay_ms: float = 0.0  # test/chaos hook: added to every generation
    type: str = "onnx"  # the worker type it registers as (a label routing and dashboards show)
    engine: str = ""  # "module:function" returning an EngineFactory; empty: the built-in ONNX engine
    isolation: str = "none"  # none | process: each loaded model's engine in its own child process

    def __post_init__(self) -> None:
        if self.isolation not in ("none", "process"):
            raise ConfigError(f"worker.isolation must be none or process, got {self.isolation!r}")


@dataclass(frozen=True, slots=True)
class PathSettings:
    fleet: str | None = None  # None: the demo (or tiny) fleet from the cache
    cache_dir: str = field(default_factory=lambda: str(Path.home() / ".cache" / "calm"))
    reports: str = "reports"


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = "INFO"
    json: bool = False


EVENT_LOOPS = ("auto", "uvloop", "asyncio")


@dataclass(frozen=True, slots=True)
class RuntimeSettings:
    event_loop: str = "auto"  # auto: uvloop when installed, else asyncio's own loop

    def __post_init__(self) -> None:
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(f"runtime.event_loop must be one of {', '.join(EVENT_LOOPS)}, got {self.event_loop!r}")


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8080
    timeout_s: float = 60.0  # longest wait for a query's reply before answering 504
    max_inflight: int = 256  # queries waiting for replies at once; more are answered 429
    api_keys: tuple[str, ...] = ()  # empty: no authentication on /v1; else a Bearer key must match one

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"gateway.port must be within 0..65535, got {self.port}")
        if self.timeout_s <= 0 or self.max_inflight <= 0:
            raise ConfigError("gateway.timeout_s and gateway.max_inflight must be > 0")


@dataclass(frozen=True, slots=True)
class Settings:
    redis: RedisSettings = field(default_factory=RedisSettings)
    streams: StreamSettings = field(default_factory=StreamSettings)
    ingress: IngressSettings = field(default_factory=IngressSettings)
    planner: PlannerSettings = field(default_factory=PlannerSettings)
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    qos: QoSSettings = field(default_factory=QoSSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    log: LogSettings = field(default_factory=LogSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)

    def replace(self, overrides: Mapping[str, Any]) -> Settings:
        """Return a copy with dotted-key overrides (``{"redis.url": "..."}``) applied."""
        return _apply(self, _nest(overrides), source="override")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Short environment names the contract promises, besides the generic CALM_<SECTION>_<FIELD>.
ENV_ALIASES: dict[str, str] = {
    "CALM_REDIS_URL": "redis.url",
    "CALM_PREFIX": "redis.prefix",
    "CALM_FLEET": "paths.fleet",
    "CALM_CACHE_DIR": "paths.cache_dir",
    "CALM_LOG_LEVEL": "log.level",
}


def load_settings(
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build settings from defaults, a TOML file (or ``CALM_CONFIG``), ``CALM_*`` variables and flags."""
    environ = os.environ if env is None else env
    settings = Settings()
    path = config_file or environ.get("CALM_CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
        settings = _apply(settings, data, source=str(path))
    settings = _apply(settings, _nest(_env_overrides(environ)), source="environment")
    if overrides:
        settings = _apply(settings, _nest({k: v for k, v in overrides.items() if v is not None}), "flags")
    return settings


def _env_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for section in dataclasses.fields(Settings):
        section_type = _resolve(Settings, section.name)
        for f in dataclasses.fields(section_type):
            var = f"CALM_{section.name}_{f.name}".upper()
            if var in environ:
                found[f"{section.name}.{f.name}"] = environ[var]
    for var, key in ENV_ALIASES.items():
        if var in environ and environ[var] != "":
            found[key] = environ[var]
    return found


def _nest(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"setting {key!r} must look like section.field")
        nested.setdefault(section, {})[name] = value
    return nested


def _apply(settings: Settings, data: Mapping[str, Any], source: str) -> Settings:
    sections: dict[str, Any] = {}
    for section_name, values in data.items():
        if section_name not in Settings.__dataclass_fields__:
            raise ConfigError(f"{source}: unknown config section {section_name!r}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: section {section_name!r} must be a table")
        current = getattr(settings, section_name)
        section_type = type(current)
        changes: dict[str, Any] = {}
        for name, raw in values.items():
            if name not in section_type.__dataclass_fields__:
                raise ConfigError(f"{source}: unknown setting {section_name}.{name}")
            changes[name] = _coerce(raw, _resolve(section_type, name), f"{section_name}.{name}", source)
        try:
            sections[section_name] = dataclasses.replace(current, **changes)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from e
    return dataclasses.replace(settings, **sections)


def _resolve(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(raw: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if raw is None or (isinstance(raw, str) and raw.lower() in ("", "none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(raw, inner[0], key, source)
    try:
        if tp is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        if tp is int:
            if isinstance(raw, bool):
                raise ValueError("boolean given")
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError("not an integer")  # int() would silently truncate 1.5 to 1
            return int(raw)
        if tp is float:
            return float(raw)
        if tp is str:
            return str(raw)
        if origin is tuple:
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            return tuple(str(i).strip() for i in items if str(i).strip())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {key} = {raw!r}: {e}") from e
    raise ConfigError(f"{source}: {key} has an unsupported type {tp!r}")
