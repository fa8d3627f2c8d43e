"""Plan and Analyze as pure functions: utility routing with SLOs, semantic fit, QoS prediction."""

from __future__ import annotations

import dataclasses

import msgspec
import numpy as np
import pytest

from broker.config import PlannerSettings
from broker.kb import ModelState
from broker.messages import Candidate, Query
from calm_actors.fleetview import FleetView, ModelView
from calm_actors.planning import (
    Heldout,
    Routable,
    UtilityStrategy,
    above_quality_floor,
    heldout_on,
    make_strategy,
    meets_slo,
    slo_shortfall,
    utility,
)
from calm_actors.scoring import (
    DEFAULT_ENERGY_PER_TOKEN_J,
    DEFAULT_LOAD_S,
    DEFAULT_MS_PER_TOKEN,
    predict,
)
from calm_actors.similarity import (
    CENTROID_WEIGHT,
    RERANK_ROWS,
    StackedProfiles,
    column_major,
    principal_axes,
    semantic_fit,
)

W = PlannerSettings()


def _q(**kw) -> Query:
    base = {"id": "q", "entry_id": "1-0", "prompt": "p", "reply_to": "calm:replies"}
    base.update(kw)
    return Query(**base)


def _c(model: str, fit: float = 0.5, latency_ms: float = 100.0, energy_j: float = 0.1, quality: float = 0.5,
       error_rate: float = 0.0, loaded: bool = True, queue: int = 0) -> Candidate:
    return Candidate(model=model, fit=fit, latency_ms=latency_ms, energy_j=energy_j, quality=quality,
                     error_rate=error_rate, loaded=loaded, queue=queue)


def _opts(*candidates: Candidate, baseline: tuple[str, ...] = ()) -> list[Routable]:
    return [Routable(c, c.model in baseline) for c in candidates]


def test_utility_formula_with_default_weights() -> None:
    c = _c("m", fit=0.8, latency_ms=500.0, energy_j=2.0, quality=0.6, error_rate=0.1, loaded=False)
    # 1*0.8 + 0.3*0.6 - 0.25*500/1000 - 0.1*2/1 - 1*0.1 - 0.05
    assert utility(c, W) == pytest.approx(0.505)
    assert utility(msgspec.structs.replace(c, loaded=True), W) == pytest.approx(0.555)


def test_highest_utility_wins() -> None:
    a = _c("a", fit=0.9, latency_ms=300.0)
    b = _c("b", fit=0.6, latency_ms=50.0)
    c = _c("c", fit=0.7, latency_ms=100.0, error_rate=0.5)
    decision = UtilityStrategy(W).choose(_q(), _opts(a, b, c))
    assert decision is not None
    assert decision.model == "a"
    assert decision.utility == pytest.approx(utility(a, W))
    assert decision.slo_met is True
    assert "3 models" in decision.reason


def test_weights_change_the_ordering() -> None:
    fit_heavy = _c("fit", fit=0.9, latency_ms=900.0)
    fast = _c("fast", fit=0.5, latency_ms=10.0)
    assert UtilityStrategy(W).choose(_q(), _opts(fit_heavy, fast)).model == "fit"
    speed = dataclasses.replace(W, w_latency=2.0)
    assert UtilityStrategy(speed).choose(_q(), _opts(fit_heavy, fast)).model == "fast"
    green = dataclasses.replace(W, w_fit=0.0, w_energy=1.0)
    cheap = _c("cheap", fit=0.1, energy_j=0.01)
    costly = _c("costly", fit=0.9, energy_j=1.0)
    assert UtilityStrategy(W).choose(_q(), _opts(cheap, costly)).model == "costly"
    assert UtilityStrategy(green).choose(_q(), _opts(cheap, costly)).model == "cheap"


def test_cold_load_penalty_breaks_a_tie() -> None:
    cold = _c("cold", loaded=False)
    warm = _c("warm", loaded=True)
    assert UtilityStrategy(W).choose(_q(), _opts(cold, warm)).model == "warm"


def test_pinned_model_wins() -> None:
    best = _c("best", fit=1.0)
    poor = _c("poor", fit=0.0, error_rate=1.0)
    decision = UtilityStrategy(W).choose(_q(model="poor"), _opts(best, poor))
    assert decision.model == "poor"
    assert "pinned" in decision.reason
    assert UtilityStrategy(W).choose(_q(model="baseline"), _opts(best, baseline=("baseline",))).model == "baseline"


def test_baseline_is_excluded_from_auto_routing() -> None:
    base = _c("base", fit=1.0, quality=1.0, latency_ms=1.0)
    small = _c("small", fit=0.2)
    decision = UtilityStrategy(W).choose(_q(), _opts(base, small, baseline=("base",)))
    assert decision.model == "small"


def test_baseline_is_used_when_nothing_else_exists() -> None:
    decision = UtilityStrategy(W).choose(_q(), _opts(_c("base"), baseline=("base",)))
    assert decision is not None and decision.model == "base"


def _measured(c: Candidate, value: float | None, baseline: bool = False, metric: str = "arithmetic.exact_match",
              se: float = 0.0) -> Routable:
    return Routable(c, baseline, None if value is None else Heldout(metric, value, se))


def test_a_baseline_measured_better_on_the_domain_than_every_specialist_gets_the_query() -> None:
    base = _measured(_c("base", fit=0.1, latency_ms=400.0, energy_j=1.0), 0.983, baseline=True)
    small = _measured(_c("small", fit=0.9, latency_ms=20.0), 0.943)
    decision = UtilityStrategy(W).choose(_q(), [base, small])
    assert decision is not None and decision.model == "base"
    assert decision.fallbacks == ["small"]  # below the floor, yet a last resort when the choice fails
    assert decision.reason.endswith("below the held-out quality floor: small")
    # with a tolerance that covers the gap, the specialist's fit and cost win again
    loose = UtilityStrategy(dataclasses.replace(W, quality_tolerance=0.05)).choose(_q(), [base, small])
    assert loose is not None and loose.model == "small"
    # 1.0 turns the floor off
    off = UtilityStrategy(dataclasses.replace(W, quality_tolerance=1.0)).choose(_q(), [base, small])
    assert off is not None and off.model == "small"


def test_specialists_of_other_domains_do_not_stand_in_for_one_below_the_floor() -> None:
    # the demo fleet: arithmetic's specialist measurably below the baseline; sort, code, prose never
    # measured on arithmetic (their cards claim other domains) must not take its queries
    base = _measured(_c("generalist", fit=0.2, latency_ms=40.0), 0.987, baseline=True, se=0.0066)
    arith = _measured(_c("arith", fit=0.7, latency_ms=14.0), 0.943, se=0.0134)
    others = [Routable(_c(name, fit=0.05, latency_ms=15.0), False, None, claims_domain=False)
              for name in ("sort", "code", "prose")]
    new_math = Routable(_c("qwen-math", fit=0.3), False, None, claims_domain=True)
    decision = UtilityStrategy(W).choose(_q(), [base, arith, *others])
    assert decision is not None and decision.model == "generalist"
    assert [o.candidate.model for o in above_quality_floor([base, arith, *others, new_math], 0.0)] == [
        "generalist", "qwen-math"]  # an unmeasured model that claims the domain is not presumed worse
    # nothing measured on the domain: the floor leaves every option in
    assert above_quality_floor(others, 0.0) == others


def test_a_specialist_at_least_as_good_as_the_baseline_keeps_the_baseline_out() -> None:
    base = _measured(_c("base", fit=0.9, latency_ms=1.0), 0.95, baseline=True)
    small = _measured(_c("small", fit=0.2), 1.0)
    worse = _measured(_c("worse", fit=0.9, latency_ms=1.0), 0.5)
    decision = UtilityStrategy(W).choose(_q(), [base, small, worse])
    assert decision is not None and decision.model == "small"


def test_the_floor_compares_models_only_on_the_same_metric_and_keeps_unmeasured_ones() -> None:
    chrf = _measured(_c("a"), 12.0, metric="code.chrf")
    lower_chrf = _measured(_c("b"), 9.0, metric="code.chrf")
    exact = _measured(_c("c"), 0.5, metric="code.exact_match")
    unmeasured = _measured(_c("d"), None)  # claims the domain
    kept = above_quality_floor([chrf, lower_chrf, exact, unmeasured], tolerance=0.1)
    assert [o.candidate.model for o in kept] == ["a", "c", "d"]
    assert [o.candidate.model for o in above_quality_floor([chrf, lower_chrf], tolerance=0.25)] == ["a", "b"]


def test_a_gap_within_the_eval_sets_noise_is_no_evidence() -> None:
    # 1 sort in 300 right against none: two standard errors of the difference cover it
    lucky = _measured(_c("base", fit=0.1), 0.0033, baseline=True, se=0.0033)
    small = _measured(_c("small", fit=0.9), 0.0, se=0.0)
    decision = UtilityStrategy(W).choose(_q(), [lucky, small])
    assert decision is not None and decision.model == "small"
    # 98.3 % against 94.3 % on 300 items each is a real gap
    base = _measured(_c("base", fit=0.1), 0.983, baseline=True, se=0.0075)
    arith = _measured(_c("small", fit=0.9), 0.943, se=0.0134)
    assert [o.candidate.model for o in above_quality_floor([base, arith], tolerance=0.0)] == ["base"]


def test_heldout_on_reads_the_cards_metric_for_the_domain() -> None:
    quality = {"arithmetic.exact_match": 0.9, "arithmetic.exact_match_se": 0.02, "code.chrf": 11.2,
               "exact_match": 0.9}
    assert heldout_on(quality, "code") == Heldout("code.chrf", 11.2, 0.0)
    assert heldout_on(quality, "arithmetic") == Heldout("arithmetic.exact_match", 0.9, 0.02)
    assert heldout_on({"prose": 0.7}, "prose") == Heldout("prose", 0.7)
    assert heldout_on(quality, "prose") is None and heldout_on(quality, "") is None


def test_no_options_means_no_decision() -> None:
    assert UtilityStrategy(W).choose(_q(), []) is None


def test_latency_slo_filters_to_the_best_meeting_model() -> None:
    slow_best = _c("slow", fit=0.95, latency_ms=800.0)
    ok = _c("ok", fit=0.6, latency_ms=200.0)
    fast_poor = _c("fastpoor", fit=0.3, latency_ms=100.0)
    options = _opts(slow_best, ok, fast_poor)
    assert UtilityStrategy(W).choose(_q(), options).model == "slow"
    decision = UtilityStrategy(W).choose(_q(slo_latency_ms=250.0), options)
    assert decision.model == "ok"
    assert decision.slo_met is True
    assert "2 models meeting" in decision.reason


def test_energy_slo() -> None:
    hungry = _c("hungry", fit=0.9, energy_j=5.0)
    frugal = _c("frugal", fit=0.5, energy_j=0.5)
    decision = UtilityStrategy(W).choose(_q(slo_energy_j=1.0), _opts(hungry, frugal))
    assert decision.model == "frugal" and decision.slo_met


def test_quality_slo() -> None:
    fitting = _c("fitting", fit=0.9, quality=0.4)
    good = _c("good", fit=0.5, quality=0.85)
    decision = UtilityStrategy(W).choose(_q(min_quality=0.8), _opts(fitting, good))
    assert decision.model == "good" and decision.slo_met


def test_when_no_model_meets_the_slo_the_closest_is_chosen_and_reported() -> None:
    far = _c("far", fit=0.95, latency_ms=2000.0)  # 300% over
    near = _c("near", fit=0.2, latency_ms=600.0)  # 20% over
    decision = UtilityStrategy(W).choose(_q(slo_latency_ms=500.0), _opts(far, near))
    assert decision.model == "near"
    assert decision.slo_met is False
    assert "no model" in decision.reason and "SLO" in decision.reason
    assert decision.utility == pytest.approx(utility(near, W))


def test_closest_ties_are_broken_by_utility() -> None:
    a = _c("a", fit=0.3, quality=0.2)
    b = _c("b", fit=0.8, quality=0.2)
    decision = UtilityStrategy(W).choose(_q(min_quality=0.9), _opts(a, b))
    assert decision.model == "b" and decision.slo_met is False


def test_slo_helpers() -> None:
    c = _c("m", latency_ms=600.0, energy_j=2.0, quality=0.6)
    assert meets_slo(c, _q())
    assert meets_slo(c, _q(slo_latency_ms=600.0, slo_energy_j=2.0, min_quality=0.6))  # bounds are inclusive
    assert not meets_slo(c, _q(slo_latency_ms=599.0))
    assert not meets_slo(c, _q(slo_energy_j=1.9))
    assert not meets_slo(c, _q(min_quality=0.7))
    assert slo_shortfall(c, _q()) == 0.0
    assert slo_shortfall(c, _q(slo_latency_ms=500.0, slo_energy_j=1.0, min_quality=0.8)) == pytest.approx(
        0.2 + 1.0 + 0.25
    )


def test_make_strategy() -> None:
    assert isinstance(make_strategy(W), UtilityStrategy)
    assert make_strategy(W).name == "utility"
    with pytest.raises(ValueError, match="unknown planner strategy 'nope'"):
        make_strategy(dataclasses.replace(W, strategy="nope"))


# -- scoring -------------------------------------------------------------------------


def _unit(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_semantic_fit_on_unit_vectors() -> None:
    e1, e2, e3 = _unit(1, 0, 0), _unit(0, 1, 0), _unit(0, 0, 1)
    w = CENTROID_WEIGHT
    assert semantic_fit(e1, np.stack([e1])) == pytest.approx(1.0, abs=1e-6)
    assert semantic_fit(e3, np.stack([e1, e2])) == pytest.approx(0.0, abs=1e-6)
    # two rows: both are among the 3 nearest (mean cosine 1/2); the centroid (1,1,0)/2 has cosine 1/sqrt2
    assert semantic_fit(e1, np.stack([e1, e2])) == pytest.approx(w / np.sqrt(2) + (1 - w) * 0.5, abs=1e-6)
    # four rows: only the 3 nearest count (e1 twice and e2: mean 2/3); the far row e3 is ignored
    rows = np.stack([e1, e1, e2, e3])
    centroid = rows.mean(axis=0)
    expected = w * float(centroid @ e1) / float(np.linalg.norm(centroid)) + (1 - w) * 2 / 3
    assert semantic_fit(e1, rows) == pytest.approx(expected, abs=1e-6)


def test_the_learned_row_scores_as_one_more_profile_row() -> None:
    rng = np.random.default_rng(3)
    for rows in (1, 2, 3, 40):
        profile = rng.normal(size=(rows, 8)).astype(np.float32)
        profile /= np.linalg.norm(profile, axis=1, keepdims=True)
        query = _unit(*rng.normal(size=8))
        for learned in (_unit(*profile[0] + query), _unit(*-query)):  # near the query, and far from it
            joined = semantic_fit(query, np.vstack([profile, learned[None, :]]))
            assert semantic_fit(query, profile, learned) == pytest.approx(joined, abs=1e-5)
            stacked = StackedProfiles({"m": profile}).fits(query, {"m": learned})
            assert stacked["m"] == pytest.approx(joined, abs=1e-5)


def test_stacked_profiles_score_every_model_as_semantic_fit_does() -> None:
    rng = np.random.default_rng(5)
    profiles = {}
    for name, rows in (("a", 1), ("b", 2), ("c", 40)):
        m = rng.normal(size=(rows, 8)).astype(np.float32)
        m /= np.linalg.norm(m, axis=1, keepdims=True)
        profiles[name] = m
    stacked = StackedProfiles(profiles)
    query = _unit(*rng.normal(size=8))
    learned = {"b": _unit(*rng.normal(size=8)), "c": _unit(*profiles["c"][0] + query)}
    fits = stacked.fits(query, learned)
    for name, matrix in profiles.items():
        assert fits[name] == pytest.approx(semantic_fit(query, matrix, learned.get(name)), abs=1e-5), name
    assert StackedProfiles({}).fits(query, {}) == {}


def _clustered_profiles(rng: np.random.Generator, dim: int, span: int) -> dict[str, np.ndarray]:
    """Three models' unit rows around their own centres, all within the first ``span`` of ``dim`` axes."""
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:, :span]
    profiles = {}
    for name in ("a", "b", "c"):
        centre = rng.normal(size=span)
        rows = (centre + 0.6 * rng.normal(size=(200, span))) @ basis.T
        profiles[name] = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    return profiles


def test_the_projected_first_pass_gives_the_exact_fits_when_the_rows_span_few_axes() -> None:
    rng = np.random.default_rng(11)
    profiles = _clustered_profiles(rng, dim=48, span=10)
    exact, projected = StackedProfiles(profiles), StackedProfiles(profiles, rank=12)
    assert exact.basis is None and projected.basis is not None
    assert projected.retained == pytest.approx(1.0)
    assert projected.columns.shape == (12, 600)  # the scan reads 12 numbers a row instead of 48
    for _ in range(50):
        query = np.ascontiguousarray(rng.choice(list(profiles.values()))[rng.integers(200)] + 0.3 * _unit(
            *rng.normal(size=48)), dtype=np.float32)
        query /= np.linalg.norm(query)
        learned = {"b": _unit(*rng.normal(size=48))}
        want, got = exact.fits(query, learned), projected.fits(query, learned)
        assert got == pytest.approx(want, abs=1e-5)


def test_the_projected_pass_rescores_its_candidates_exactly() -> None:
    """Rows spread over every axis: a rank-2 pass is a rough guess, but each fit is still made of exact
    cosines of real rows, so it never exceeds the exact fit (its candidates' best rows are at most the true best)."""
    rng = np.random.default_rng(12)
    profiles = {}
    for name in ("a", "b"):
        rows = rng.normal(size=(100, 16))
        profiles[name] = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    assert StackedProfiles(profiles, rank=2).basis is None  # 2 of 16 axes keep too little: one exact pass
    exact, projected = StackedProfiles(profiles), StackedProfiles(profiles, rank=2, min_retained=0.0)
    assert projected.retained is not None and projected.retained < 0.5
    missed = 0
    for _ in range(30):
        query = _unit(*rng.normal(size=16))
        want, got = exact.fits(query, {}), projected.fits(query, {})
        assert all(got[n] <= want[n] + 1e-6 for n in profiles)
        missed += any(got[n] < want[n] - 1e-6 for n in profiles)
    assert missed > 0  # the rough pass did miss nearest rows here: the bound above was put to the test


def test_a_rank_that_saves_nothing_leaves_the_scan_exact() -> None:
    rng = np.random.default_rng(13)
    profiles = _clustered_profiles(rng, dim=16, span=4)
    for rank in (0, 16, 40):
        assert StackedProfiles(profiles, rank).basis is None
    few = {name: m[:RERANK_ROWS] for name, m in profiles.items()}  # every row is a candidate anyway
    assert StackedProfiles(few, rank=4).basis is None
    assert StackedProfiles({}, rank=4).fits(_unit(*rng.normal(size=16)), {}) == {}


def test_principal_axes_keep_the_directions_the_rows_use() -> None:
    rows = np.zeros((6, 5), np.float32)
    rows[:3, 1] = [1.0, 2.0, -1.0]
    rows[3:, 3] = [0.5, 0.2, 0.1]
    axes, kept = principal_axes(rows, 2)
    assert axes.shape == (5, 2) and axes.dtype == np.float32 and kept == pytest.approx(1.0)
    assert principal_axes(rows, 1)[1] == pytest.approx(6 / 6.3)  # squared lengths: 1 + 4 + 1 and 0.25 + 0.04 + 0.01
    assert np.abs(axes[:, 0]) == pytest.approx([0, 1, 0, 0, 0], abs=1e-6)
    assert np.abs(axes[:, 1]) == pytest.approx([0, 0, 0, 1, 0], abs=1e-6)


def test_exemplars_near_the_query_outweigh_a_distant_description() -> None:
    query = _unit(1, 0.1, 0)
    with_exemplars = np.stack([_unit(0, 0, 1), _unit(1, 0, 0), _unit(1, 0.2, 0), _unit(0.9, 0, 0.1)])
    description_only = np.stack([_unit(0.5, 0.5, 0.5)])
    assert semantic_fit(query, with_exemplars) > semantic_fit(query, description_only)


def test_semantic_fit_ranks_the_closer_profile_higher() -> None:
    query = _unit(1, 0.2, 0)
    math = np.stack([_unit(1, 0, 0), _unit(0.9, 0.1, 0)])
    chat = np.stack([_unit(0, 0, 1), _unit(0, 0.3, 1)])
    assert semantic_fit(query, math) > semantic_fit(query, chat)


def _view(state: ModelState, loaded_on: tuple[str, ...] = (), backlog: int = 0) -> ModelView:
    return ModelView(state=state, profile=np.stack([_unit(1, 0)]), servable_on=("w1", "w2"), loaded_on=loaded_on,
                     backlog=backlog)


def test_predict_adds_cold_load_time_when_not_loaded() -> None:
    state = ModelState(name="m", latency_ms=100.0, ms_per_token=1.0, load_s=2.0, energy_j=0.3, confidence=0.8,
                       error_rate=0.05)
    q = _q(max_new_tokens=16)
    warm = predict(q, _view(state, loaded_on=("w1",)), 0.7, FleetView())
    cold = predict(q, _view(state), 0.7, FleetView())
    assert warm.latency_ms == pytest.approx(100.0)
    assert cold.latency_ms == pytest.approx(100.0 + 2000.0)
    assert warm.loaded and not cold.loaded
    assert (warm.fit, warm.energy_j, warm.quality, warm.error_rate) == (0.7, 0.3, 0.8, 0.05)


def test_predict_adds_queue_time_with_backlog() -> None:
    state = ModelState(name="m", latency_ms=100.0, ms_per_token=1.0)
    q = _q(max_new_tokens=16)
    one = predict(q, _view(state, loaded_on=("w1",), backlog=3), 0.5, FleetView())
    two = predict(q, _view(state, loaded_on=("w1", "w2"), backlog=3), 0.5, FleetView())
    assert one.latency_ms == pytest.approx(100.0 + 3 * 100.0)
    assert two.latency_ms == pytest.approx(100.0 + 3 * 100.0 / 2)  # replicas share the backlog
    assert one.queue == 3


def test_predict_uses_priors_without_telemetry() -> None:
    q = _q(max_new_tokens=20)
    c = predict(q, _view(ModelState(name="new")), 0.4, FleetView())
    assert c.latency_ms == pytest.approx(DEFAULT_MS_PER_TOKEN * 20 + 1000.0 * DEFAULT_LOAD_S)
    assert c.energy_j == pytest.approx(DEFAULT_ENERGY_PER_TOKEN_J * 20)
    assert c.quality == 0.5
    assert c.model == "new"


def test_predict_scales_per_token_cost_for_long_asks() -> None:
    state = ModelState(name="m", latency_ms=10.0, ms_per_token=4.0, energy_per_token_j=0.01)
    c = predict(_q(max_new_tokens=64), _view(state, loaded_on=("w1",)), 0.5, FleetView())
    assert c.latency_ms == pytest.approx(4.0 * 8)  # at least ms_per_token * min(tokens, 8)
    assert c.energy_j == pytest.approx(0.01 * 64)


def _cands() -> list:  # type: ignore[type-arg]
    from broker.messages import Candidate
    from calm_actors.planning import Routable

    def c(model: str, fit: float) -> Routable:
        return Routable(Candidate(model=model, fit=fit, latency_ms=10, energy_j=0.1, quality=0.5, error_rate=0.0,
                                  loaded=True, queue=0), baseline=model == "base")

    return [c("b", 0.2), c("a", 0.9), c("base", 0.95), c("c", 0.5)]


def test_benchmark_strategies_leave_the_baseline_out_and_honour_pins() -> None:
    from broker.config import PlannerSettings
    from broker.messages import Query
    from calm_actors.planning import make_strategy

    q = Query(id="q1", entry_id="1-0", prompt="p", reply_to="calm:replies")
    semantic = make_strategy(PlannerSettings(strategy="semantic"))
    assert semantic.choose(q, _cands()).model == "a"  # type: ignore[union-attr]
    rr = make_strategy(PlannerSettings(strategy="round-robin"))
    assert [rr.choose(q, _cands()).model for _ in range(4)] == ["a", "b", "c", "a"]  # type: ignore[union-attr]
    rnd = make_strategy(PlannerSettings(strategy="random"))
    picks = {rnd.choose(Query(id=f"q{i}", entry_id="1-0", prompt="p", reply_to="calm:replies"),  # type: ignore[union-attr]
                        _cands()).model for i in range(50)}
    assert picks == {"a", "b", "c"}
    pinned = Query(id="q", entry_id="1-0", prompt="p", reply_to="calm:replies", model="base")
    for strategy in (semantic, rr, rnd):
        assert strategy.choose(pinned, _cands()).model == "base"  # type: ignore[union-attr]


def test_models_whose_context_cannot_hold_the_prompt_are_not_candidates() -> None:
    from broker.messages import Query
    from calm_actors.scoring import fits_context

    short = Query(id="q", entry_id="1-0", prompt="12+7=", reply_to="calm:replies")
    long = Query(id="q", entry_id="1-0", prompt="x = 1\n" * 40, reply_to="calm:replies")
    assert fits_context(short, 64) and fits_context(long, 0)
    assert not fits_context(long, 64) and fits_context(long, 512)
    assert fits_context(Query(id="q", entry_id="1-0", prompt="sort 9 3 5 =", reply_to="calm:replies"), 64)


def test_fit_shares_sharpen_small_cosine_gaps_into_clear_preferences() -> None:
    from calm_actors.scoring import fit_shares

    shares = fit_shares([0.62, 0.58, 0.30], temperature=0.02)
    assert sum(shares) == pytest.approx(1.0)
    assert shares[0] > 0.85 and shares[1] < 0.15 and shares[2] < 1e-6
    softer = fit_shares([0.62, 0.58, 0.30], temperature=0.2)
    assert shares[0] - shares[1] > softer[0] - softer[1] > 0.62 - 0.58
    assert fit_shares([0.62, 0.58], temperature=0) == [0.62, 0.58]
    assert fit_shares([0.4], temperature=0.02) == [0.4]


def test_a_clearly_better_fit_outweighs_a_more_confident_neighbour() -> None:
    from calm_actors.scoring import fit_shares

    w = PlannerSettings()

    def cand(model: str, fit: float, latency_ms: float, energy_j: float, quality: float) -> Candidate:
        return Candidate(model=model, fit=fit, latency_ms=latency_ms, energy_j=energy_j, quality=quality,
                         error_rate=0.0, loaded=True, queue=0)

    right, wrong = fit_shares([0.40, 0.33], w.fit_temperature)  # a typical code prompt: code vs prose
    assert utility(cand("code", right, 50, 0.4, 0.3), w) > utility(cand("prose", wrong, 45, 0.35, 0.6), w)
    # with raw cosines the neighbour's confidence would win
    assert utility(cand("prose", 0.33, 45, 0.35, 0.6), w) > utility(cand("code", 0.40, 50, 0.4, 0.3), w)


def test_exploration_probes_only_models_that_fit_the_query() -> None:
    w = PlannerSettings(explore_interval_s=10)

    def cand(model: str, fit: float, age_s: float) -> Routable:
        return Routable(Candidate(model=model, fit=fit, latency_ms=20, energy_j=0.1, quality=0.9, error_rate=0.0,
                                  loaded=True, queue=0, age_s=age_s), baseline=False)

    fresh_best = cand("arith", 0.7, 1)
    unrelated = cand("code", 0.05, 500)  # stale, but it does not fit an arithmetic prompt
    neighbour = cand("generalist", 0.4, 500)  # stale and a plausible fit
    decision = UtilityStrategy(w).choose(_q(), [fresh_best, unrelated], now_s=1000)
    assert decision is not None and decision.model == "arith" and not decision.explored
    decision = UtilityStrategy(w).choose(_q(), [fresh_best, unrelated, neighbour],
                                         now_s=1000)
    assert decision is not None and decision.explored and decision.model == "generalist"


def test_column_major_products_equal_row_products() -> None:
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((300, 16)).astype(np.float32)
    vector = rng.standard_normal(16).astype(np.float32)
    columns = column_major(rows)
    assert columns.shape == (16, 300) and columns.flags.c_contiguous and columns.dtype == np.float32
    np.testing.assert_allclose(vector @ columns, rows @ vector, rtol=1e-5, atol=1e-5)
