"""Demand buckets and the forecasters: the smoothing arithmetic, extrapolation, seasons, nowcasts."""

from __future__ import annotations

import math

import pytest

from broker.config import SchedulerSettings
from calm_actors.forecast import Demand, Holt, HoltWinters, make_forecaster, surprise


def test_demand_counts_in_buckets_and_windows() -> None:
    demand = Demand(10.0)
    for t in (0.0, 9.99, 10.0, 35.0, 59.0, 61.0):
        demand.add("a", t)
    demand.add("b", 5.0, n=3)
    assert [demand.count("a", b) for b in range(7)] == [2, 1, 0, 1, 0, 1, 1]
    assert demand.total("a") == 6 and demand.total("b") == 3 and demand.total("never") == 0
    assert demand.models() == ["a", "b"]
    assert demand.first_bucket() == 0
    # the buckets after the one holding now - span: (61 - 30) -> bucket 3, so buckets 4..6
    assert demand.window("a", 61.0, 30.0) == 2
    assert demand.window("a", 61.0, 1000.0) == 6
    before = demand.version
    demand.set("a", {100: 4})
    assert demand.version > before
    assert demand.total("a") == 4 and demand.count("a", 0) == 0 and demand.count("a", 100) == 4
    with pytest.raises(ValueError):
        Demand(0)


def test_holt_update_is_double_exponential_smoothing() -> None:
    holt = Holt(alpha=0.5, beta=0.25)
    holt.update([4.0])
    assert (holt.level, holt.trend) == (4.0, 0.0)  # the first bucket sets the level
    holt.update([8.0])
    # level = 0.5*8 + 0.5*(4 + 0) = 6; trend = 0.25*(6 - 4) + 0.75*0 = 0.5
    assert holt.level == pytest.approx(6.0) and holt.trend == pytest.approx(0.5)
    holt.update([2.0])
    # level = 0.5*2 + 0.5*(6 + 0.5) = 4.25; trend = 0.25*(4.25 - 6) + 0.75*0.5 = -0.0625
    assert holt.level == pytest.approx(4.25) and holt.trend == pytest.approx(-0.0625)
    assert holt.predict(3) == pytest.approx([4.1875, 4.125, 4.0625])


def test_holt_converges_on_a_constant_and_extrapolates_a_ramp() -> None:
    flat = Holt(alpha=0.3, beta=0.1)
    flat.update([5.0] * 200)
    assert flat.predict(4) == pytest.approx([5.0] * 4, abs=1e-6)
    ramp = Holt(alpha=0.5, beta=0.3)
    ramp.update([2.0 * t for t in range(100)])  # 0, 2, ..., 198
    assert ramp.predict(3) == pytest.approx([200.0, 202.0, 204.0], rel=1e-3)


def test_predictions_never_go_negative() -> None:
    falling = Holt(alpha=0.9, beta=0.9)
    falling.update([10.0, 6.0, 2.0, 0.0])
    assert falling.trend < 0
    assert all(x >= 0 for x in falling.predict(10)) and falling.predict(10)[-1] == 0.0


def test_outlook_nowcasts_the_bucket_in_progress_without_changing_state() -> None:
    holt = Holt(alpha=0.5, beta=0.2)
    holt.update([3.0, 4.0, 5.0, 6.0])
    state = (holt.level, holt.trend, holt.seen)
    # Nothing seen yet of a bucket that has just begun: exactly the plain forecast, one bucket longer.
    assert holt.outlook(6, count=0.0, fraction=0.0) == pytest.approx(sum(holt.predict(7)))
    # A bucket that is over counts as a completed one.
    twin = Holt(holt.alpha, holt.beta, holt.level, holt.trend, holt.seen)
    twin.update([20.0])
    assert holt.outlook(6, count=20.0, fraction=1.0) == pytest.approx(sum(twin.predict(6)))
    # A surge half way through the bucket raises the outlook; silence lowers it.
    quiet, surge = holt.outlook(6, 0.0, 0.5), holt.outlook(6, 30.0, 0.5)
    assert quiet < holt.outlook(6, 0.0, 0.0) < surge
    assert (holt.level, holt.trend, holt.seen) == state


def test_holt_winters_learns_a_cycle_and_sees_the_rise_coming() -> None:
    season = [0.0] * 6 + [10.0] * 4  # quiet for 6 buckets, busy for 4, every 10 buckets
    hw = HoltWinters(season=10, alpha=0.2, beta=0.0, gamma=0.5, smooth=0)
    hw.update(season * 6)
    # Now at the start of a quiet part: the forecast stays low, then rises where the busy part begins.
    path = hw.predict(10)
    assert max(path[:5]) < 2.0
    assert min(path[6:]) > 8.0
    plain = Holt(alpha=0.2, beta=0.0)
    plain.update(season * 6)
    flat = plain.predict(10)
    assert max(flat) - min(flat) < 1e-9  # Holt alone has no notion of the cycle


def test_holt_winters_behaves_as_holt_until_a_season_is_seen() -> None:
    hw = HoltWinters(season=4, alpha=0.5, beta=0.25)
    holt = Holt(alpha=0.5, beta=0.25)
    for x in (4.0, 8.0, 2.0):
        hw.update([x])
        holt.update([x])
    assert hw.predict(3) == pytest.approx(holt.predict(3))
    assert hw.outlook(2, 1.0, 0.5) == pytest.approx(holt.outlook(2, 1.0, 0.5))
    with pytest.raises(ValueError):
        HoltWinters(season=1)


def test_make_forecaster_follows_the_config() -> None:
    assert isinstance(make_forecaster(SchedulerSettings()), Holt)
    seasonal = make_forecaster(SchedulerSettings(forecaster="seasonal", season_s=600.0, bucket_s=10.0))
    assert isinstance(seasonal, HoltWinters) and seasonal.season == 60
    assert isinstance(make_forecaster(SchedulerSettings(forecaster="seasonal", season_s=0.0)), Holt)


def test_a_surprising_silence_restarts_the_level_at_once() -> None:
    # Busy at 11 a bucket, then nothing: plain Holt lags for buckets; with change detection the level restarts.
    plain, watchful = Holt(alpha=0.3, beta=0.02), Holt(alpha=0.3, beta=0.02, change_nats=-math.log(0.003))
    for holt in (plain, watchful):
        holt.update([11.0] * 6)
    state = (watchful.level, watchful.trend, watchful.run)
    assert watchful.outlook(2, 0.0, 0.1) == pytest.approx(plain.outlook(2, 0.0, 0.1))  # a second of silence: no news
    assert watchful.quiet(0.0, 0.1) == pytest.approx(1.1)  # 1.1 requests were due: e^-1.1 to see none
    assert plain.outlook(2, 0.0, 0.7) > 15.0  # seven seconds of silence: Holt still expects most of its rate
    assert watchful.outlook(2, 0.0, 0.7) == 0.0  # e^-7.7 under the forecast: the phase is over
    assert (watchful.level, watchful.trend, watchful.run) == state  # outlook changed no state
    plain.update([0.0])
    watchful.update([0.0])
    assert plain.level > 7.0 and watchful.level == 0.0 and watchful.trend == 0.0
    # Noise does not trip it: Poisson-like counts around a steady rate never restart the level.
    steady = Holt(alpha=0.3, beta=0.02, change_nats=-math.log(0.003))
    steady.update([11.0, 8.0, 14.0, 10.0, 12.0, 7.0, 13.0, 11.0, 9.0])
    assert 9.0 < steady.level < 13.0 and steady.run.buckets > 0


def test_a_surprising_surge_restarts_the_level_and_default_forecasters_watch() -> None:
    holt = Holt(alpha=0.3, beta=0.02, change_nats=-math.log(0.003))
    holt.update([0.0] * 10 + [12.0])
    assert holt.level == pytest.approx(12.0)
    assert surprise(0.0, 5.0) == pytest.approx(5.0) and surprise(5.0, 5.0) == 0.0
    assert surprise(1.0, 0.0) == pytest.approx(surprise(1.0, 0.1))  # expectations are floored: finite
    assert make_forecaster(SchedulerSettings()).change_nats == pytest.approx(-math.log(0.003))  # type: ignore[attr-defined]
    assert make_forecaster(SchedulerSettings(change_p=0.0)).change_nats == 0.0  # type: ignore[attr-defined]


def test_holt_winters_change_detection_is_relative_to_the_season() -> None:
    season = [0.0] * 6 + [10.0] * 4
    hw = HoltWinters(season=10, alpha=0.2, beta=0.0, gamma=0.5, smooth=0, change_nats=-math.log(0.003))
    hw.update(season * 6)
    level = hw.level
    hw.update(season[:6])  # the quiet part, as forecast: no change
    assert hw.level == pytest.approx(level, abs=0.5)
    assert hw.predict(4)[0] > 8.0  # the rise is still coming
    hw.update([0.0, 0.0])  # the busy part stays silent: that is news
    assert hw.quiet(0.0, 0.0) == 0.0 and hw.level < level - 5.0
