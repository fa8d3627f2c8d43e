"""The ``forecast`` residency policy: keep loaded what the forecast says will be asked for next.

Every planning interval it forecasts each model's requests over ``horizon_s`` (one forecaster per
model over bucketed demand, nowcast with the bucket in progress), values each model as expected
requests × cold-load cost (load time × value), and plans the resident set per worker that holds the
most value within the memory budget (greedy by value per MB). Against churn: a resident model keeps
its place unless a rival is worth ``1 + hysteresis`` times more; the plan never evicts a model it
prefetched less than ``min_residency_s`` ago, a pinned one (work waiting or a command in flight), or
one worth as much as the model it would make room for; and a request that needs a model nobody holds
evicts old models before young ones (loaded less than ``min_residency_s`` ago, on demand or by the
plan), lowest value first, a young one only when nothing else makes room (a waiting request outranks
residency). When the only room would come from a model worth more than one loaded on demand less
than ``min_residency_s`` ago that is still busy (loading or serving a one-off request), the request
waits for that one (bounded) instead of pushing the busier model out. Loads the plan wants are prefetches: they happen
before the requests come. A model whose expected rate exceeds what one copy serves (``capacity_rps``)
gets a copy on a second worker, up to ``max_replicas``.

Against a forecast that lags a change of phase (a model whose phase just ended is still forecast
busy for a while): the forecasters restart their level on counts too unlikely under them
(``change_p``); when a request needs room, a prefetch not yet asked for ranks lower the quieter
than forecast its model has been (worth × ``exp(-quiet_discount × surprise)``, the surprise in
nats); and a prefetch that a request evicted before the model was asked for is not repeated until
the model is asked for again or ``min_residency_s`` has passed, unless the forecast sees the model
rising later in the horizon (a seasonal prefetch): the plan does not keep fetching back a model
the requests push out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from broker.config import SchedulerSettings
from calm_actors.forecast import RARE, Demand, Forecaster, make_forecaster
from calm_actors.residency import Action, ModelCosts, Slot, make_room, place_on_demand

MAX_HISTORY_BUCKETS = 8640  # how far back a fresh policy learns from (a day of 10 s buckets)
KEEP = math.inf
RISE = 1.5  # a forecast this many times higher later in the horizon than next is a predicted rise


@dataclass(frozen=True, slots=True)
class Entry:
    """One copy of a model the plan may keep: its worth (raw and with the incumbent's bonus)."""

    model: str
    copy: int  # 1 for the first copy, 2 for a replica ...
    expected: float  # requests this copy is expected to serve over the horizon
    worth: float
    ranked: float  # worth, raised for incumbents (hysteresis) or infinite when it must stay


class ForecastPolicy:
    """Plans residency from forecast demand × cold-load cost, with hysteresis and minimum residency."""

    name = "forecast"

    def __init__(self, settings: SchedulerSettings, demand: Demand, costs: ModelCosts | None = None) -> None:
        self.settings = settings
        self.demand = demand
        self.costs = costs or ModelCosts()
        self.horizon = max(1, round(settings.horizon_s / settings.bucket_s))
        self._forecasters: dict[str, Forecaster] = {}
        self._fed: int | None = None  # the first bucket the forecasters have not seen
        self._loaded_at: dict[tuple[str, str], tuple[float, bool]] = {}  # (worker, model) -> (when, by the plan)
        self._fetched: dict[tuple[str, str], int] = {}  # prefetched (worker, model) -> its requests then
        self._refuted: dict[str, tuple[float, int]] = {}  # model -> (when, its requests then): not to prefetch
        self._expected_at: tuple[float, int, dict[str, float], dict[str, float]] | None = None
        self._settled: tuple[object, ...] | None = None  # inputs of the last plan that changed nothing
        self.waiting: dict[str, float] = {}  # model -> since when its request waits for a busy one-off model

    # -- forecasting ---------------------------------------------------------------
    def expected(self, models: Iterable[str], now_s: float) -> dict[str, float]:
        """Requests each model is expected to get from ``now_s`` to the end of the horizon."""
        return self._forecast(models, now_s)[0]

    def quiet(self, models: Iterable[str], now_s: float) -> dict[str, float]:
        """How much quieter than its forecast each model has been lately (nats; 0: not quieter)."""
        return self._forecast(models, now_s)[1]

    def _forecast(self, models: Iterable[str], now_s: float) -> tuple[dict[str, float], dict[str, float]]:
        wanted = set(models) | set(self.demand.models())
        cached = self._expected_at
        if cached is not None and cached[:2] == (now_s, self.demand.version) and wanted <= cached[2].keys():
            return cached[2], cached[3]
        self._catch_up(wanted, now_s)
        current = self.demand.bucket(now_s)
        fraction = now_s / self.demand.bucket_s - current
        out, quiet = {}, {}
        for m in wanted:
            count = self.demand.count(m, current)
            out[m] = self._forecasters[m].outlook(self.horizon, count, fraction)
            quiet[m] = self._forecasters[m].quiet(count, fraction)
        self._expected_at = (now_s, self.demand.version, out, quiet)
        return out, quiet

    def _catch_up(self, models: set[str], now_s: float) -> None:
        """Feed every completed bucket the forecasters have not seen yet; start them again from the history
        when a count changed in a bucket they have seen (so a forecast depends on the counts, not on when
        they arrived)."""
        current = self.demand.bucket(now_s)
        revised = self.demand.take_revised()
        if revised is not None and self._fed is not None and revised < self._fed:
            self._forecasters.clear()
            self._fed = None
        if self._fed is None:
            first = self.demand.first_bucket()
            self._fed = current if first is None else max(min(first, current), current - MAX_HISTORY_BUCKETS)
        self._fed = max(self._fed, current - MAX_HISTORY_BUCKETS)
        for model in models - set(self._forecasters):
            self._forecasters[model] = make_forecaster(self.settings)
        for bucket in range(self._fed, current):
            for model, forecaster in self._forecasters.items():
                forecaster.update((self.demand.count(model, bucket),))
        self._fed = max(self._fed, current)

    def worth(self, models: Iterable[str], now_s: float) -> dict[str, float]:
        """Expected requests × what serving each warm saves."""
        return {m: e * self.costs.cold_cost(m) for m, e in self.expected(models, now_s).items()}

    # -- acting --------------------------------------------------------------------
    def place(self, model: str, slots: list[Slot], memory_mb: Mapping[str, float], now_s: float,
              pinned: Iterable[str] = ()) -> list[Action]:
        """A request needs ``model``: load it, evicting old models before young ones, lowest forecast first."""
        worth = self.worth(memory_mb, now_s)
        quiet = self.quiet(memory_mb, now_s)
        young = self._young(slots, now_s, on_demand=True)

        def key(slot: Slot, victim: str) -> tuple[bool, float, float]:
            value = worth.get(victim, 0.0)
            if self._unproven(slot.worker, victim):  # fetched for requests that are not coming as forecast?
                value *= math.exp(-self.settings.quiet_discount * quiet.get(victim, 0.0))
            return (slot.worker, victim) in young, value, slot.loaded[victim]

        actions = place_on_demand(model, slots, memory_mb, pinned, key, "load on demand (lowest forecast makes room)")
        if self._wait_for_pin(model, actions, slots, memory_mb, set(pinned), worth, now_s):
            return []
        for action in actions:  # a request pushed out a prefetch before its model was asked for
            if action.kind == "evict" and self._unproven(action.worker, action.model) \
                    and not self._rising(action.model):
                self._refuted[action.model] = (now_s, self._fetched[(action.worker, action.model)])
        self.note(actions, now_s)
        return actions

    def _wait_for_pin(self, model: str, actions: list[Action], slots: list[Slot], memory_mb: Mapping[str, float],
                      pinned: set[str], worth: Mapping[str, float], now_s: float) -> bool:
        """Whether ``model``'s request should wait for a busy one-off model rather than evict ``actions``' victims.

        A model loaded on demand less than ``min_residency_s`` ago (a one-off request's) is pinned
        while it loads and serves; evicting a busier model instead costs that model's next request a
        cold load. When such a pinned model is worth less than every victim and its memory would make
        the room, the request waits (``place`` returns nothing; the caller asks again) for at most
        two of its load times plus two planning intervals.
        """
        cap = self._wait_cap(model, actions, slots, memory_mb, pinned, worth, now_s)
        since = self.waiting.get(model)
        if cap is not None:
            if since is None or now_s - since > 2 * cap:  # a new wait (an old entry is an earlier wait's)
                since = self.waiting[model] = now_s
            if now_s - since < cap:
                return True
        self.waiting.pop(model, None)
        return False

    def _wait_cap(self, model: str, actions: list[Action], slots: list[Slot], memory_mb: Mapping[str, float],
                  pinned: set[str], worth: Mapping[str, float], now_s: float) -> float | None:
        """How long ``model``'s request may wait for busy one-off models to make room (None: it may not)."""
        victims = [a.model for a in actions if a.kind == "evict"]
        if not victims:
            return None
        bar = min(worth.get(v, 0.0) for v in victims)
        slot = next(s for s in slots if s.worker == actions[0].worker)
        one_offs = {m for (w, m), by_plan in self._recent_loads(now_s).items() if w == slot.worker and not by_plan}
        busy = [m for m in slot.loaded if m in one_offs and m in pinned and m != model and worth.get(m, 0.0) < bar]
        if not busy or slot.free_mb(memory_mb) + sum(memory_mb.get(m, 0.0) for m in busy) < memory_mb.get(model, 0.0):
            return None
        slowest = max(self.costs.load_s.get(m, self.costs.default_load_s) for m in busy)
        return 2 * slowest + 2 * self.settings.interval_ms / 1000

    def plan(self, slots: list[Slot], memory_mb: Mapping[str, float], now_s: float,
             pinned: Iterable[str] = ()) -> list[Action]:
        """Prefetch what the plan wants where it is missing, evicting (lowest worth first) only for room."""
        keep = set(pinned)
        young = self._young(slots, now_s)
        inputs = (self.demand.bucket(now_s), self.demand.version, frozenset(keep), frozenset(young),
                  tuple((s.worker, s.budget_mb, frozenset(s.loaded)) for s in slots))
        if inputs == self._settled:  # same demand, residents and protections: the plan stands
            return []
        entries = self._entries(slots, memory_mb, now_s, keep, young)
        planned = self._assign(entries, slots, memory_mb)
        worth = self.worth(memory_mb, now_s)
        actions: list[Action] = []
        for slot in slots:
            want = planned[slot.worker]
            protected = keep | {m for w, m in young if w == slot.worker} | set(want)
            projected = Slot(slot.worker, slot.budget_mb, slot.servable, dict(slot.loaded))  # as it will be

            def rank(model: str, held: dict[str, float] = projected.loaded) -> tuple[float, float]:
                return worth.get(model, 0.0), held[model]

            for model in sorted(set(want) - set(slot.loaded), key=lambda m: -want[m].worth):
                need = memory_mb.get(model, 0.0)
                # Never evict a model worth as much as the one it would make room for (hysteresis included).
                bar = want[model].worth
                worthy = {m for m in projected.loaded if worth.get(m, 0.0) * (1.0 + self.settings.hysteresis) >= bar}
                victims = make_room(projected, need, memory_mb, protected | worthy, rank)
                if victims is None:
                    continue
                for victim in victims:
                    del projected.loaded[victim]
                    actions.append(Action("evict", slot.worker, victim, f"plan: room for {model}"))
                projected.loaded[model] = now_s
                expected = want[model].expected
                actions.append(Action("load", slot.worker, model,
                                      f"prefetch: {expected:.1f} requests expected in {self.settings.horizon_s:.0f}s"))
        self.note(actions, now_s, by_plan=True)
        self._settled = None if actions else inputs
        return actions

    def _unproven(self, worker: str, model: str) -> bool:
        """Whether the plan prefetched ``model`` on ``worker`` and nobody has asked for it since."""
        asked = self._fetched.get((worker, model))
        return asked is not None and self.demand.total(model) <= asked

    def _rising(self, model: str) -> bool:
        """Whether the forecast has ``model`` clearly busier later in the horizon than next (a predicted rise)."""
        path = self._forecasters[model].predict(self.horizon) if model in self._forecasters else []
        return bool(path) and max(path) > RISE * path[0] + RARE

    def note(self, actions: Iterable[Action], now_s: float, by_plan: bool = False) -> None:
        """Remember when loads happened (this policy's own, or the caller's, e.g. a warm start's fill)."""
        for action in actions:
            key = (action.worker, action.model)
            if action.kind == "load":
                self._loaded_at[key] = (now_s, by_plan)
                if by_plan:
                    self._fetched[key] = self.demand.total(action.model)
                else:
                    self._fetched.pop(key, None)
            else:
                self._loaded_at.pop(key, None)
                self._fetched.pop(key, None)

    def _young(self, slots: list[Slot], now_s: float, on_demand: bool = False) -> set[tuple[str, str]]:
        """(worker, model) pairs loaded less than ``min_residency_s`` ago and still resident.

        For the plan, a prefetch is young. For a request that needs room (``on_demand``), so is a
        load on demand (this policy's, or one the caller ``note``-d) of a model the forecast expects
        at least ``prefetch_min_requests`` of and that was asked for at least twice in the last
        ``min_residency_s``: two models asked for in turn do not evict each other while an old model
        could go instead, but the model of a one-off request (whose single request alone lifts its
        forecast) is the first to go. The plan may still undo a load on demand at once when
        the forecast says the room is worth more to another model (a one-off request's model goes
        again as soon as the busy model it displaced is back). A model found resident without a
        noted load (loaded before this policy started) is old.
        """
        held = {(s.worker, m) for s in slots for m in s.loaded}
        self._loaded_at = {k: v for k, v in self._loaded_at.items() if k in held}
        self._fetched = {k: v for k, v in self._fetched.items() if k in held}
        recent = self._recent_loads(now_s)
        if not on_demand or not recent:
            return {k for k, by_plan in recent.items() if by_plan}
        expected = self.expected({m for _, m in recent}, now_s)
        floor, span = self.settings.prefetch_min_requests, self.settings.min_residency_s
        return {k for k, by_plan in recent.items() if by_plan or (
            expected.get(k[1], 0.0) >= floor and self.demand.window(k[1], now_s, span) >= 2)}

    def _recent_loads(self, now_s: float) -> dict[tuple[str, str], bool]:
        """Noted loads less than ``min_residency_s`` old: (worker, model) -> whether the plan made it."""
        span = self.settings.min_residency_s
        return {k: by_plan for k, (t, by_plan) in self._loaded_at.items() if now_s - t < span}

    def _entries(self, slots: list[Slot], memory_mb: Mapping[str, float], now_s: float, keep: set[str],
                 young: set[tuple[str, str]]) -> list[Entry]:
        s = self.settings
        expected = self.expected(memory_mb, now_s)
        entries: list[Entry] = []
        self._refuted = {m: (t, n) for m, (t, n) in self._refuted.items()
                         if now_s - t < s.min_residency_s and self.demand.total(m) <= n}
        for model, demand in expected.items():
            need = memory_mb.get(model, 0.0)
            servers = [x for x in slots if model in x.servable and x.budget_mb >= need]
            holders = [x for x in servers if model in x.loaded]
            must = model in keep or any((x.worker, model) in young for x in holders)
            capacity = self.costs.capacity_rps.get(model, 0.0) * s.horizon_s
            for copy in range(1, min(s.max_replicas, len(servers)) + 1):
                if copy > 1 and capacity <= 0:
                    break
                share = demand if copy == 1 else max(0.0, demand - (copy - 1) * capacity)
                incumbent = copy <= len(holders)
                if not incumbent and (share < s.prefetch_min_requests or model in self._refuted):
                    break
                worth = share * self.costs.cold_cost(model)
                if must and incumbent:
                    ranked = KEEP
                elif incumbent:
                    ranked = worth * (1.0 + s.hysteresis)
                else:
                    ranked = worth
                entries.append(Entry(model, copy, share, worth, ranked))
        return entries

    def _assign(self, entries: list[Entry], slots: list[Slot], memory_mb: Mapping[str, float]
                ) -> dict[str, dict[str, Entry]]:
        """Greedy knapsack per worker: copies in order of ranked worth per MB, incumbents where they are."""
        room = {x.worker: x.budget_mb for x in slots}
        planned: dict[str, dict[str, Entry]] = {x.worker: {} for x in slots}

        def density(e: Entry) -> tuple[float, float, str, int]:
            return -e.ranked / max(memory_mb.get(e.model, 0.0), 1e-6), -e.ranked, e.model, e.copy

        for entry in sorted(entries, key=density):
            if entry.ranked <= 0.0:
                continue
            need = memory_mb.get(entry.model, 0.0)
            free = [x for x in slots if entry.model in x.servable and entry.model not in planned[x.worker]
                    and room[x.worker] >= need]
            if not free:
                continue
            holding = [x for x in free if entry.model in x.loaded]
            target = holding[0] if holding else max(free, key=lambda x: room[x.worker])
            planned[target.worker][entry.model] = entry
            room[target.worker] -= need
        return planned
