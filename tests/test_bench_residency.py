"""The residency simulator and ``calm bench residency``: the policies' behaviour on seeded traces, the CLI shape."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from broker.config import SchedulerSettings
from calm import cli
from calm.bench.simulator import POLICY_NAMES, Simulation, compare, simulate
from calm.bench.traces import Request, TraceError, TraceSpec, generate, read_trace
from calm_actors.forecast import Demand
from calm_actors.residency import Action, make_policy

MODELS = tuple(f"m{i}" for i in range(10))
SLOTS = dict.fromkeys(MODELS, 1.0)


def _standard(kind: str, requests: int = 10_000) -> list[Request]:
    """The standard traces: 10 models, 4 busy at a time with 95 % of 1 request/s, seed 0."""
    spec = TraceSpec(kind, MODELS, requests=requests, rate=1.0, hot=4, hot_share=0.95, phase_s=1200.0,
                     period_s=3600.0, seed=0)
    return generate(spec)


@pytest.mark.parametrize("kind, settings", [
    ("phase", SchedulerSettings()),
    ("periodic", SchedulerSettings(forecaster="seasonal", season_s=3600.0)),
])
def test_forecast_halves_lru_cold_loads_and_stays_near_belady(kind: str, settings: SchedulerSettings) -> None:
    results = compare(_standard(kind), 4.0, SLOTS, settings, load_s=0.0, policies=("lru", "forecast", "belady"))
    forecast = results["forecast"]
    assert forecast["cold_load_rate"] <= 0.5 * results["lru"]["cold_load_rate"], results
    assert forecast["cold_load_rate"] <= 1.25 * results["belady"]["cold_load_rate"], results
    assert forecast["vs_lru"] == pytest.approx(forecast["cold_load_rate"] / results["lru"]["cold_load_rate"])


def test_belady_is_the_bound_for_loading_on_misses() -> None:
    trace = _standard("steady", requests=3000)
    results = compare(trace, 4.0, SLOTS, SchedulerSettings(), load_s=0.0)
    assert set(results) == set(POLICY_NAMES)
    for name in ("lru", "demand60", "static"):  # policies that load only on a miss never beat it
        assert results[name]["cold_loads"] >= results["belady"]["cold_loads"], name


def _events(trace: list[Request], name: str, settings: SchedulerSettings, load_s: float = 0.0,
            react_s: float = math.inf) -> tuple[list[tuple[float, Action]], set[float]]:
    """Every action the policy took (with its time) and the arrival times of cold requests."""
    actions: list[tuple[float, Action]] = []
    cold: set[float] = set()

    class Recording(Simulation):
        def _apply(self, todo: list[Action], now: float) -> None:
            actions.extend((now, a) for a in todo)
            super()._apply(todo, now)

        def arrive(self, request: Request) -> None:
            before = self.stats.cold_loads
            super().arrive(request)
            if self.stats.cold_loads > before:
                cold.add(request.t)

    demand = Demand(settings.bucket_s)
    ranking = sorted(MODELS)
    Recording(make_policy(name, settings, demand, ranking=ranking), demand, 2.0, {"a": 1.0, "b": 1.0, "p": 1.0},
              dict.fromkeys("abp", load_s), settings.interval_ms / 1000, react_s).run(trace)
    return actions, cold


def test_a_one_off_model_gives_its_room_back_as_soon_as_it_has_served() -> None:
    # a and b fill both slots, each asked twice a second; p is asked once, just after 30 s.
    busy = [Request(i * 0.25, "b" if i % 2 else "a") for i in range(240)]
    trace = sorted([*busy, Request(30.01, "p")], key=lambda r: r.t)
    settings = SchedulerSettings(interval_ms=1000, react_ms=20, bucket_s=2.0, horizon_s=4.0, min_residency_s=6.0)
    reacting, cold = _events(trace, "forecast", settings, load_s=0.1, react_s=settings.react_ms / 1000)
    displaced = next(a.model for t, a in reacting if t == 30.01 and a.kind == "evict")
    back = [t for t, a in reacting if t > 30.01 and a.kind == "load" and a.model == displaced]
    # p is loaded at 30.01 and ready at 30.11; the plan runs 20 ms later, not at the next interval (31.0).
    assert back and back[0] == pytest.approx(30.13), reacting
    assert ("evict", "p") in {(a.kind, a.model) for t, a in reacting if t == back[0]}
    assert {t for t in cold if t > 29.0} == {30.01}  # the displaced model is back before its next request
    _, cold_without = _events(trace, "forecast", settings, load_s=0.1)  # plans only every interval
    assert {t for t in cold_without if t > 29.0} > {30.01}


def _daily_burst(cycles: int = 8) -> list[Request]:
    """a busy all day; p for the first 2 of every 10 minutes, b for the other 8 (two slots: a plus one)."""
    rng = random.Random(3)
    out: list[Request] = []
    t = 0.0
    while t < cycles * 600:
        t += rng.expovariate(1.0)
        out.append(Request(t, rng.choice(["a", "p"] if t % 600 < 120 else ["a", "b"])))
    return out


def test_prefetch_happens_before_a_predicted_rise() -> None:
    trace = _daily_burst()
    firsts = {int(r.t // 600): r.t for r in reversed(trace) if r.model == "p"}  # first p request per cycle
    settings = SchedulerSettings(forecaster="seasonal", season_s=600.0, horizon_s=60.0)
    actions, cold = _events(trace, "forecast", settings)
    for cycle in range(3, 8):  # once the forecaster has seen the cycle
        start = cycle * 600.0
        early = [t for t, a in actions if a.kind == "load" and a.model == "p" and start - 60 <= t < start]
        assert early, f"p was not prefetched before the rise of cycle {cycle}"
        assert all(a.reason.startswith("prefetch") for t, a in actions if t in early and a.model == "p")
        assert firsts[cycle] not in cold, f"the first request of cycle {cycle} found p cold"
    _, lru_cold = _events(trace, "lru", settings)
    assert all(firsts[c] in lru_cold for c in range(3, 8))  # LRU always meets the rise cold


@pytest.mark.parametrize("seed", range(3))
def test_budgets_are_never_exceeded(seed: int) -> None:
    rng = random.Random(seed)
    memory = {m: float(rng.choice([200, 300, 500, 800, 1200])) for m in MODELS}
    trace = generate(TraceSpec(rng.choice(["steady", "phase", "periodic", "burst"]), MODELS, requests=2000,
                               rate=2.0, hot=3, hot_share=0.8, phase_s=300.0, period_s=900.0, seed=seed))
    for name in POLICY_NAMES:  # the simulator raises BudgetExceeded on any load over the budget
        stats = simulate(name, trace, 2000.0, memory, SchedulerSettings(min_residency_s=5.0), load_s=0.5)
        assert 0 < stats.peak_used <= 2000.0, name
        assert stats.loads > 0 and stats.evictions > 0, name


def test_no_thrash_on_a_steady_trace() -> None:
    # The busy models fit: after loading them once nothing is ever evicted.
    fits = generate(TraceSpec("steady", MODELS, requests=5000, rate=1.0, hot=4, hot_share=1.0, seed=0))
    stats = simulate("forecast", fits, 4.0, SLOTS, SchedulerSettings(), load_s=0.5)
    assert (stats.loads, stats.evictions) == (4, 0)
    # One busy model too many, all equally busy: evictions are those the misses force, not plan churn.
    crowded = generate(TraceSpec("steady", MODELS, requests=5000, rate=1.0, hot=5, hot_share=1.0, seed=0))
    steady = simulate("forecast", crowded, 4.0, SLOTS, SchedulerSettings(), load_s=0.0)
    jumpy = simulate("forecast", crowded, 4.0, SLOTS, SchedulerSettings(hysteresis=0.0, min_residency_s=0.0),
                     load_s=0.0)
    assert steady.evictions <= 1.25 * steady.cold_loads  # ~1.2 here; churn without hysteresis is ~1.45
    assert steady.evictions < 0.85 * jumpy.evictions


# -- trace files -----------------------------------------------------------------------
def test_trace_files_jsonl_and_csv(tmp_path: Path) -> None:
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"t": 2.5, "model": "a"}\n\n{"t": 1, "domain": "code"}\n')
    csv = tmp_path / "t.csv"
    csv.write_text("time,domain\n1.0,code\n0.5,prose\n")

    def resolve(kind: str, name: str) -> str:
        return name if kind == "model" else f"specialist-of-{name}"

    assert read_trace(jsonl, resolve) == [Request(1.0, "specialist-of-code"), Request(2.5, "a")]
    assert read_trace(csv, resolve) == [Request(0.5, "specialist-of-prose"), Request(1.0, "specialist-of-code")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t": 1, "model": "a"}\n{"model": "b"}\n')
    with pytest.raises(TraceError, match=r"bad\.jsonl:2"):
        read_trace(bad, resolve)


# -- the command -------------------------------------------------------------------------
FLEET_TOML = """
[fleet]
name = "cards"
{models}
"""
CARD = """
[[models]]
name = "{name}"
path = "models/{name}"
description = "d"
examples = ["x"]
prompt_template = "{{prompt}}"
domains = ["{domain}"]
memory_mb = {mb}
baseline = {baseline}
"""


@pytest.fixture
def card_fleet(tmp_path: Path) -> Path:
    cards = [("arith", "arithmetic", 300, "false"), ("sorter", "sorting", 300, "false"),
             ("coder", "code", 500, "false"), ("general", "arithmetic", 800, "true")]
    text = FLEET_TOML.format(models="".join(CARD.format(name=n, domain=d, mb=mb, baseline=b) for n, d, mb, b in cards))
    (tmp_path / "fleet").mkdir()
    (tmp_path / "fleet" / "fleet.toml").write_text(text)
    return tmp_path / "fleet"


def _run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("calm.bench",))
    code = cli.main(["bench", "residency", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_shape(tmp_path: Path, card_fleet: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(0)
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"t": i * 0.7, "domain": rng.choice(["arithmetic", "sorting", "code"])}) + "\n"
                             for i in range(400)))
    code, out, _ = _run(monkeypatch, capsys, "--trace", str(trace), "--fleet", str(card_fleet),
                        "--memory-mb", "900", "--json")
    assert code == 0
    report = json.loads(out)
    assert set(report["policies"]) == {"lru", "demand60", "static", "forecast", "belady"}
    for row in report["policies"].values():
        assert {"cold_loads", "cold_load_rate", "loads", "evictions"} <= set(row)
        assert row["cold_load_rate"] == pytest.approx(row["cold_loads"] / 400)
        assert row["peak_used"] <= 900
    assert set(report["trace"]["models"]) == {"arith", "sorter", "coder"}  # domains went to their specialists
    assert report["capacity"] == {"budget": 900.0, "unit": "MB", "load_s": 0.0,
                                  "memory": {"arith": 300.0, "coder": 500.0, "general": 800.0, "sorter": 300.0}}


def test_cli_synthetic_trace_written_and_replayed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "phase.jsonl"
    code, out, _ = _run(monkeypatch, capsys, "--synthetic", "phase", "--slots", "3", "--requests", "500",
                        "--models", "6", "--out", str(out_file), "--json", "--policies", "lru,forecast",
                        "--set", "scheduler.alpha=0.4")
    assert code == 0
    report = json.loads(out)
    assert set(report["policies"]) == {"lru", "forecast"} and report["scheduler"]["alpha"] == 0.4
    written = read_trace(out_file, lambda kind, name: name)
    assert len(written) == 500 and {r.model for r in written} <= {f"m{i}" for i in range(6)}
    code, out, _ = _run(monkeypatch, capsys, "--trace", str(out_file), "--slots", "3", "--json",
                        "--policies", "lru,forecast", "--set", "scheduler.alpha=0.4")
    assert json.loads(out)["policies"] == report["policies"]  # the same trace replays the same way


def test_cli_table_and_errors(tmp_path: Path, card_fleet: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(monkeypatch, capsys, "--synthetic", "steady", "--slots", "2", "--requests", "200",
                        "--models", "4")
    assert code == 0 and "belady" in out and "forecast" in out
    code, _, err = _run(monkeypatch, capsys, "--synthetic", "steady", "--requests", "10")
    assert code == 2 and "--slots" in err  # a capacity is required
    code, _, err = _run(monkeypatch, capsys, "--synthetic", "steady", "--slots", "2", "--policies", "fifo")
    assert code == 2 and "fifo" in err
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"t": 1, "model": "nope"}\n')
    code, _, err = _run(monkeypatch, capsys, "--trace", str(trace), "--fleet", str(card_fleet), "--slots", "2")
    assert code == 1 and "nope" in err
    code, _, err = _run(monkeypatch, capsys, "--synthetic", "steady", "--memory-mb", "500", "--requests", "10")
    assert code == 1 and "--fleet" in err


@pytest.mark.parametrize("name", ["lru", "forecast"])
def test_no_thrash_between_two_models_on_a_two_slot_phase_shift(name: str) -> None:
    # Three models, two busy per phase (75/25), two slots: a phase shift costs a load or two, never a ping-pong.
    rng = random.Random(7)
    trace: list[Request] = []
    t = 0.0
    for phase, (major, minor) in enumerate([("a", "b"), ("b", "p"), ("p", "a")]):
        while (t := t + rng.expovariate(1.5)) < (phase + 1) * 40.0:
            trace.append(Request(round(t, 3), major if rng.random() < 0.75 else minor))
    memory = {"a": 1.0, "b": 1.0, "p": 1.0}
    stats = simulate(name, trace, 2.0, memory, SchedulerSettings(), load_s=0.1)
    assert stats.evictions <= 2 * 3, stats  # at most two per phase shift


def test_live_slots_budget_holds_k_models_with_headroom_but_never_k_plus_one() -> None:
    from types import SimpleNamespace

    from calm.bench.residency_live import slots_budget_mb

    fleet: Any = SimpleNamespace(models=[SimpleNamespace(memory_mb=mb) for mb in (5, 5, 5)])
    assert slots_budget_mb(fleet, 2) == 14  # two 5 MB cards measured up to 7 MB each still fit; three never do
    assert slots_budget_mb(fleet, 1) == 9
    assert slots_budget_mb(fleet, 3) == 15  # every model fits: no headroom needed
    uneven: Any = SimpleNamespace(models=[SimpleNamespace(memory_mb=mb) for mb in (2, 3, 9)])
    assert slots_budget_mb(uneven, 1) == 9  # the largest must fit, even if that lets two small ones in
