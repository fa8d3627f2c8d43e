"""Trace-driven residency simulator: the live scheduler's policy code, run in simulated time.

One simulated worker holds models within a budget (``--slots K``: one unit per model, budget K;
``--memory-mb M``: the fleet cards' memory). Requests arrive per the trace; the policy is asked,
exactly as the live scheduler asks it, to ``place`` a model a request needs and nobody holds, and
to ``plan`` every ``scheduler.interval_ms`` and ``scheduler.react_ms`` after a model loaded for waiting
requests has served them. A load takes ``load_s`` of simulated time; a request that finds its model
absent or still loading is a cold load and waits for it (served the moment the load ends).

Counted per policy: ``cold_loads`` (requests whose model was not ready when they arrived),
``loads``, ``evictions``, ``unserved`` (requests still waiting at the end), ``wait_s`` (total time
requests waited for loads) and ``wasted_mb_s``: memory × time held by loads that served no request
before they were evicted or the trace ended (prefetches that did not pay off, models kept for
nothing; in slot-seconds with ``--slots``).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from broker.config import SchedulerSettings
from calm.bench.traces import Request
from calm_actors.forecast import Demand
from calm_actors.residency import Action, ModelCosts, ResidencyPolicy, Slot, make_policy, place_on_demand

POLICY_NAMES = ("lru", "demand60", "static", "forecast", "belady")
WORKER = "sim"


class BudgetExceeded(AssertionError):
    """A policy asked for a load that would overrun the budget (a bug, never a result)."""


@dataclass(slots=True)
class Stats:
    requests: int = 0
    cold_loads: int = 0
    loads: int = 0
    evictions: int = 0
    unserved: int = 0
    wait_s: float = 0.0
    wasted_mb_s: float = 0.0
    peak_used: float = 0.0

    @property
    def cold_load_rate(self) -> float:
        return self.cold_loads / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cold_load_rate": self.cold_load_rate}


class BeladyPolicy:
    """The offline optimum for loading on demand (Belady's MIN): evict the model needed furthest ahead.

    Simulator only: it reads the whole trace. With unequal model sizes it is the classic heuristic
    rather than a proven optimum. Policies that prefetch can beat it: it is the bound for loading on
    misses only.
    """

    name = "belady"

    def __init__(self, trace: Sequence[Request]) -> None:
        times: dict[str, list[float]] = defaultdict(list)
        for r in trace:
            times[r.model].append(r.t)
        self._times = dict(times)

    def next_use(self, model: str, now_s: float) -> float:
        times = self._times.get(model, [])
        i = bisect.bisect_left(times, now_s)
        return times[i] if i < len(times) else math.inf

    def place(self, model: str, slots: list[Slot], memory_mb: Mapping[str, float], now_s: float,
              pinned: Iterable[str] = ()) -> list[Action]:
        return place_on_demand(model, slots, memory_mb, pinned, lambda s, v: -self.next_use(v, now_s),
                               "load on demand (needed furthest ahead makes room)")

    def plan(self, slots: list[Slot], memory_mb: Mapping[str, float], now_s: float,
             pinned: Iterable[str] = ()) -> list[Action]:
        return []


@dataclass(slots=True)
class Simulation:
    """One policy replaying one trace on one simulated worker."""

    policy: ResidencyPolicy
    demand: Demand
    budget: float
    memory: Mapping[str, float]
    load_s: Mapping[str, float]
    interval_s: float
    react_s: float = math.inf  # plan this long after a load for waiting requests ends (inf: only every interval)
    stats: Stats = field(default_factory=Stats)
    slot: Slot = field(init=False)
    ready_at: dict[str, float] = field(default_factory=dict)
    loaded_at: dict[str, float] = field(default_factory=dict)
    served: dict[str, bool] = field(default_factory=dict)
    queued: dict[str, list[float]] = field(default_factory=dict)  # model -> arrival times waiting for it
    reactions: list[float] = field(default_factory=list)  # heap: when to plan after a load for waiting requests

    def __post_init__(self) -> None:
        self.slot = Slot(WORKER, self.budget, frozenset(self.memory), {})

    def run(self, trace: Sequence[Request]) -> Stats:
        if not trace:
            return self.stats
        next_tick = trace[0].t
        for request in trace:
            while min(next_tick, self.reactions[0] if self.reactions else math.inf) <= request.t:
                if self.reactions and self.reactions[0] < next_tick:
                    self.react(heapq.heappop(self.reactions))
                else:
                    self.tick(next_tick)
                    next_tick += self.interval_s
            self.arrive(request)
        end = trace[-1].t
        self._complete(end)
        self.stats.unserved = sum(len(q) for q in self.queued.values())
        for model in list(self.slot.loaded):
            self._close(model, end)
        return self.stats

    def tick(self, now: float) -> None:
        """What the live scheduler does every interval: place models with waiting work, then plan."""
        self._complete(now)
        for model in [m for m, q in self.queued.items() if q and m not in self.slot.loaded]:
            self._apply(self.policy.place(model, [self.slot], self.memory, now, self._busy(now)), now)
        self._apply(self.policy.plan([self.slot], self.memory, now, self._busy(now)), now)

    def react(self, now: float) -> None:
        """What the live scheduler does once a model loaded for waiting requests has served them: plan."""
        self._complete(now)
        self._apply(self.policy.plan([self.slot], self.memory, now, self._busy(now)), now)

    def arrive(self, request: Request) -> None:
        now, model = request.t, request.model
        self._complete(now)
        self.demand.add(model, now)
        self.stats.requests += 1
        if model in self.slot.loaded and self.ready_at[model] <= now:
            self.slot.loaded[model] = now
            self.served[model] = True
            return
        self.stats.cold_loads += 1
        self.queued.setdefault(model, []).append(now)
        if model not in self.slot.loaded:
            self._apply(self.policy.place(model, [self.slot], self.memory, now, self._busy(now)), now)

    def _busy(self, now: float) -> set[str]:
        """Models being loaded or with requests waiting: never evicted (the live scheduler pins them too)."""
        loading = {m for m in self.slot.loaded if self.ready_at[m] > now}
        return loading | {m for m, q in self.queued.items() if q}

    def _complete(self, now: float) -> None:
        """Serve the requests whose model has finished loading by ``now``."""
        for model, waiting in self.queued.items():
            if not waiting or model not in self.slot.loaded:
                continue
            ready = self.ready_at[model]
            if ready <= now:
                self.stats.wait_s += sum(ready - t for t in waiting)
                waiting.clear()
                self.served[model] = True
                self.slot.loaded[model] = ready

    def _apply(self, actions: list[Action], now: float) -> None:
        for action in actions:
            model = action.model
            if action.kind == "evict":
                if model not in self.slot.loaded:
                    raise AssertionError(f"{self.policy.name} evicts {model}, which is not loaded")
                self._close(model, now)
                self.stats.evictions += 1
            else:
                if model in self.slot.loaded:
                    raise AssertionError(f"{self.policy.name} loads {model}, which is loaded")
                need = self.memory.get(model, 0.0)
                used = self.slot.used_mb(self.memory) + need
                if used > self.budget + 1e-9:
                    raise BudgetExceeded(f"{self.policy.name} loads {model}: {used} > budget {self.budget}")
                self.stats.peak_used = max(self.stats.peak_used, used)
                self.slot.loaded[model] = now
                self.ready_at[model] = now + self.load_s.get(model, 0.0)
                if self.queued.get(model) and math.isfinite(self.react_s):
                    heapq.heappush(self.reactions, self.ready_at[model] + self.react_s)
                self.loaded_at[model] = now
                self.served[model] = False
                self.stats.loads += 1

    def _close(self, model: str, now: float) -> None:
        if not self.served.get(model, False):
            self.stats.wasted_mb_s += self.memory.get(model, 0.0) * max(0.0, now - self.loaded_at[model])
        del self.slot.loaded[model]
        self.ready_at.pop(model, None)


def simulate(name: str, trace: Sequence[Request], budget: float, memory: Mapping[str, float],
             settings: SchedulerSettings | None = None, load_s: float | Mapping[str, float] = 1.0) -> Stats:
    """Replay ``trace`` through policy ``name`` (one of :data:`POLICY_NAMES`) and count what happened."""
    settings = settings or SchedulerSettings()
    loads = dict.fromkeys(memory, load_s) if isinstance(load_s, int | float) else dict(load_s)
    demand = Demand(settings.bucket_s)
    policy: ResidencyPolicy
    if name == "belady":
        policy = BeladyPolicy(trace)
    else:
        totals: dict[str, int] = defaultdict(int)
        for r in trace:
            totals[r.model] += 1
        ranking = sorted(totals, key=lambda m: (-totals[m], m))  # static: the operator knows the overall mix
        costs = ModelCosts(load_s=dict(loads))
        policy = make_policy(name, settings, demand, costs, ranking=ranking)
    sim = Simulation(policy, demand, budget, memory, loads, settings.interval_ms / 1000, settings.react_ms / 1000)
    return sim.run(trace)


def compare(trace: Sequence[Request], budget: float, memory: Mapping[str, float],
            settings: SchedulerSettings | None = None, load_s: float | Mapping[str, float] = 1.0,
            policies: Sequence[str] = POLICY_NAMES) -> dict[str, dict[str, Any]]:
    """Every policy on the same trace, with each one's cold-load rate relative to LRU's and Belady's."""
    results = {name: simulate(name, trace, budget, memory, settings, load_s).to_dict() for name in policies}
    for ref in ("lru", "belady"):
        base = results.get(ref, {}).get("cold_load_rate")
        for row in results.values():
            row[f"vs_{ref}"] = (row["cold_load_rate"] / base) if base else None
    return results
