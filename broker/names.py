"""Every stream, consumer group and key name CALM uses, under one prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Names:
    """Builds key names under ``prefix`` (``calm:`` by default)."""

    prefix: str = "calm:"

    # -- public streams (contract) -------------------------------------------------
    @property
    def queries(self) -> str:
        return f"{self.prefix}queries"

    @property
    def replies(self) -> str:
        return f"{self.prefix}replies"

    @property
    def dead(self) -> str:
        return f"{self.prefix}dead"

    @property
    def decisions(self) -> str:
        return f"{self.prefix}decisions"

    # -- internal pipeline streams -------------------------------------------------
    @property
    def analyze(self) -> str:
        return f"{self.prefix}analyze"

    @property
    def plan(self) -> str:
        return f"{self.prefix}plan"

    @property
    def execute(self) -> str:
        return f"{self.prefix}execute"

    @property
    def results(self) -> str:
        return f"{self.prefix}results"

    @property
    def telemetry(self) -> str:
        return f"{self.prefix}telemetry"

    @property
    def sched(self) -> str:
        return f"{self.prefix}sched"

    def work(self, model: str) -> str:
        return f"{self.prefix}work:{model}"

    def control(self, worker_id: str) -> str:
        return f"{self.prefix}control:{worker_id}"

    # -- knowledge base ------------------------------------------------------------
    def model(self, name: str) -> str:
        return f"{self.prefix}model:{name}"

    def profile(self, name: str) -> str:
        """The model's routing profile: float32 embedding rows (description, examples, exemplars)."""
        return f"{self.prefix}profile:{name}"

    def exemplars(self, name: str) -> str:
        """The model's exemplar prompts (JSON list) as its worker registered them."""
        return f"{self.prefix}exemplars:{name}"

    @property
    def classifier(self) -> str:
        """The fleet's domain classifier (hash: ``digest``, ``models``, ``blob``), trained by the monitor."""
        return f"{self.prefix}classifier"

    @property
    def models(self) -> str:
        return f"{self.prefix}models"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}workers"

    def worker_alive(self, worker_id: str) -> str:
        return f"{self.prefix}alive:worker:{worker_id}"

    def actor(self, role: str, instance: str) -> str:
        return f"{self.prefix}actor:{role}:{instance}"

    @property
    def actors(self) -> str:
        return f"{self.prefix}actors"

    def window(self, model: str, metric: str) -> str:
        return f"{self.prefix}window:{model}:{metric}"

    def demand(self, model: str) -> str:
        return f"{self.prefix}demand:{model}"

    def domain_demand(self, domain: str) -> str:
        """Queries per time bucket whose topic is ``domain`` (whichever model served them)."""
        return f"{self.prefix}demand-domain:{domain}"

    def done(self, query_id: str) -> str:
        return f"{self.prefix}done:{query_id}"

    def claim(self, query_id: str) -> str:
        return f"{self.prefix}claim:{query_id}"

    @property
    def inflight(self) -> str:
        return f"{self.prefix}inflight"

    @property
    def inflight_data(self) -> str:
        return f"{self.prefix}inflight:data"

    @property
    def kb_version(self) -> str:
        return f"{self.prefix}kb:version"

    def cache_exact(self, digest: str) -> str:
        return f"{self.prefix}cache:exact:{digest}"

    @property
    def cache_exact_index(self) -> str:
        return f"{self.prefix}cache:exact-index"

    def cache_semantic(self, domain: str) -> str:
        return f"{self.prefix}cache:semantic:{domain or 'any'}"

    def faults(self, model: str) -> str:
        """Injected faults for a model (``delay_ms``, ``error_rate``, ``confidence_scale``): chaos and tests."""
        return f"{self.prefix}faults:{model}"

    @property
    def runtime_config(self) -> str:
        """Hash of ``section.field`` overrides applied by running actors (``calm config set``)."""
        return f"{self.prefix}config"

    @property
    def counters(self) -> str:
        return f"{self.prefix}counters"

    # -- consumer groups -----------------------------------------------------------
    GROUP_MONITOR = "monitor"
    GROUP_TELEMETRY = "monitor-telemetry"
    GROUP_ANALYZER = "analyzer"
    GROUP_PLANNER = "planner"
    GROUP_EXECUTOR = "executor"
    GROUP_RESULTS = "executor-results"
    GROUP_SCHEDULER = "scheduler"
    GROUP_WORKERS = "workers"
    GROUP_CONTROL = "control"

    def replies_allowed(self, stream: str) -> bool:
        """True when ``stream`` is a permitted ``reply_to`` (starts with the replies prefix)."""
        return stream.startswith(self.replies)
