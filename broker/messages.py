"""Typed internal messages. Every one is a frozen msgspec Struct, tagged by kind, msgpack on the wire.

``SCHEMA_VERSION`` is carried by every message; a reader refuses versions it does not know.
"""

from __future__ import annotations

import msgspec

SCHEMA_VERSION = 1


class Message(msgspec.Struct, frozen=True, tag_field="kind", kw_only=True, omit_defaults=True):
    """Base of every internal message."""

    v: int = SCHEMA_VERSION


class Query(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A validated ingress query: everything the later stages need, so none of them reads it again."""

    id: str
    entry_id: str
    prompt: str
    reply_to: str
    max_new_tokens: int = 64
    temperature: float = 0.0
    model: str | None = None  # pinned model; None means CALM chooses
    slo_latency_ms: float | None = None
    slo_energy_j: float | None = None
    min_quality: float | None = None
    arrived_ms: float = 0.0  # wall-clock ms of the ingress entry


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    """One model's scores for one query, as the analyzer computed them."""

    model: str
    fit: float  # semantic fit share, 0..1: cosine softmax, sharpened between specialists by the classifier
    latency_ms: float  # predicted end-to-end latency including queue and cold load
    energy_j: float  # predicted energy for this query
    quality: float  # predicted quality/confidence 0..1
    error_rate: float
    loaded: bool
    queue: int  # work waiting or in flight for this model
    load_ms: float = 0.0  # the cold-load part of latency_ms (0 when loaded)
    age_s: float = 1e9  # seconds since the model's last telemetry sample
    requests: int = 0
    cosine: float = 0.0  # the raw cosine fit to the model's profile that ``fit`` was derived from


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """The planner's choice and why."""

    model: str
    reason: str
    utility: float = 0.0
    slo_met: bool = True
    explored: bool = False
    wanted: str = ""  # a better model the planner would have chosen had it been loaded
    fallbacks: list[str] = []  # next choices, tried in order when an attempt fails or times out


class ReplyCopy(msgspec.Struct, frozen=True, kw_only=True):
    """Some of a reply's fields (a msgpack map) to SET under ``key`` for ``ttl_s`` in the reply's transaction."""

    key: str
    ttl_s: int
    fields: list[str]


class Embedded(Message, frozen=True, tag="embedded"):
    """Monitor → analyzer: the query and its embedding (float32 bytes, L2-normalised)."""

    query: Query
    embedding: bytes
    stamps: dict[str, float] = {}
    exact_hit: bytes = b""  # the exact cache's entry for this query (msgpack), found by the monitor: no scoring
    embedding_truncated: bool = False  # the embedding is of the prompt's opening only (see SentenceEmbedder)


class Scored(Message, frozen=True, tag="scored"):
    """Analyzer → planner: the query and every candidate's scores."""

    query: Query
    candidates: list[Candidate]
    domain: str = ""
    stamps: dict[str, float] = {}
    embedding: bytes = b""
    exact_hit: bytes = b""  # carried from Embedded: the query is answered from the exact cache
    embedding_truncated: bool = False


class Planned(Message, frozen=True, tag="planned"):
    """Planner → executor: the query and the decision."""

    query: Query
    decision: Decision
    domain: str = ""
    stamps: dict[str, float] = {}
    embedding: bytes = b""
    exact_hit: bytes = b""  # carried from Scored: the executor replies with it instead of dispatching
    embedding_truncated: bool = False


class Work(Message, frozen=True, tag="work"):
    """Executor → worker (on the model's work stream): one generation to run."""

    id: str
    attempt: int
    model: str
    prompt: str
    max_new_tokens: int
    temperature: float
    dispatched_ms: float
    seed: int | None = None
    # With a reply stream, a worker that succeeds delivers the query's reply itself, in the transaction that adds
    # its result: ``reply`` (a msgpack map) holds the fields only the executor knows (route, domain, decision),
    # ``arrived_ms`` the query's arrival for latency_ms, ``reply_copy`` what else the reply's transaction
    # writes. Empty: the executor replies on the result.
    reply_to: str = ""
    reply: bytes = b""
    arrived_ms: float = 0.0
    reply_copy: ReplyCopy | None = None  # e.g. the exact cache's entry: readable once the reply is


class Result(Message, frozen=True, tag="result"):
    """Worker → executor: the outcome of one :class:`Work`."""

    id: str
    attempt: int
    model: str
    worker: str
    ok: bool
    text: str = ""
    error: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    energy_j: float = 0.0
    energy_source: str = "estimate"
    confidence: float = 0.0
    finish_reason: str = ""


class Telemetry(Message, frozen=True, tag="telemetry"):
    """Worker → monitor: what one request cost, to keep the knowledge base's QoS current."""

    model: str
    worker: str
    ok: bool
    inference_ms: float
    queue_ms: float
    tokens_out: int
    energy_j: float
    confidence: float
    at_ms: float


class Control(Message, frozen=True, tag="control"):
    """Scheduler → worker: load or evict a model."""

    action: str  # "load" | "evict"
    model: str
    reason: str = ""
    at_ms: float = 0.0


class WantModel(Message, frozen=True, tag="want"):
    """Planner → scheduler: a query needs ``model`` and no worker has it loaded."""

    model: str
    query_id: str = ""
    at_ms: float = 0.0


class WorkerEvent(Message, frozen=True, tag="worker_event"):
    """Worker → scheduler: registered, loaded, evicted, load failed, or stopping."""

    worker: str
    event: str  # registered | loaded | evicted | load_failed | stopping
    model: str = ""
    detail: str = ""
    memory_mb: float = 0.0
    at_ms: float = 0.0





class Inflight(Message, frozen=True, tag="inflight"):
    """Executor bookkeeping for a dispatched query (kept in Redis so any executor can finish it)."""

    query: Query
    decision: Decision
    domain: str = ""
    attempt: int = 1
    dispatched_ms: float = 0.0
    stamps: dict[str, float] = {}
    embedding: bytes = b""
    embedding_truncated: bool = False
AnyMessage = Embedded | Scored | Planned | Work | Result | Telemetry | Control | WantModel | WorkerEvent | Inflight
