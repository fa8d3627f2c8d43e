"""The bench report's paired bootstrap intervals of Δp50 and ΔJ, from recorded replies."""

from __future__ import annotations

import numpy as np
import pytest

from calm.loadgen import Run
from calm.report import comparison, markdown, paired_change_intervals, percentile, strategy_report
from calm.workload import Item


def _items(n: int) -> list[Item]:
    return [Item(t=i * 0.1, domain="code" if i % 2 else "arithmetic", prompt=f"p{i}", reference="r",
                 max_new_tokens=4) for i in range(n)]


def _run(strategy: str, items: list[Item], latency: list[float], energy: list[float]) -> Run:
    ids = [f"{strategy}-{i}" for i in range(len(items))]
    replies = {qid: {"status": "ok", "text": "r", "model": "m", "latency_ms": str(lat), "route_ms": "1",
                     "energy_j": str(j), "cached": "0"}
               for qid, lat, j in zip(ids, latency, energy, strict=True)}
    return Run(strategy, items, ids, replies, 0.0, 1000.0)


def test_a_uniform_change_has_a_point_interval() -> None:
    items = _items(40)
    lat = [10.0 + i for i in range(40)]
    base = _run("single", items, lat, [0.2] * 40)
    other = _run("calm", items, [x / 2 for x in lat], [0.05] * 40)  # every query half as slow, a quarter the J
    got = paired_change_intervals(base, other)
    assert got["latency_p50_ms"] == [-50.0, -50.0]
    assert got["energy_j_per_query"] == [-75.0, -75.0]


def test_the_interval_holds_the_run_figure_and_is_deterministic() -> None:
    items = _items(60)
    lat = [5.0 + (i * 37) % 50 for i in range(60)]
    energy = [0.01 * (1 + (i * 11) % 7) for i in range(60)]
    base = _run("single", items, lat, energy)
    other = _run("calm", items, [x * (0.3 if i % 2 else 0.9) for i, x in enumerate(lat)],
                 [e * (0.2 if i % 3 else 0.6) for i, e in enumerate(energy)])
    got = paired_change_intervals(base, other)
    p50 = 100 * (percentile(list(_vals(other, "latency_ms")), 50) / percentile(list(_vals(base, "latency_ms")), 50) - 1)
    mean_j = 100 * (sum(_vals(other, "energy_j")) / sum(_vals(base, "energy_j")) - 1)
    low, high = got["latency_p50_ms"]
    assert low < p50 < high and low < high
    low, high = got["energy_j_per_query"]
    assert low < mean_j < high
    assert paired_change_intervals(base, other) == got
    assert paired_change_intervals(base, other, seed=1) != got  # another draw, other bounds


def _vals(run: Run, key: str) -> list[float]:
    return [float(run.replies[q][key]) for q in run.ids]


def test_failed_queries_are_left_out_and_other_workloads_refused() -> None:
    items = _items(20)
    base = _run("single", items, [10.0] * 20, [0.1] * 20)
    other = _run("calm", items, [4.0] * 20, [0.02] * 20)
    for qid in other.ids[:5]:
        other.replies[qid] = {"status": "error", "latency_ms": "1000", "energy_j": "9"}
    got = paired_change_intervals(base, other)
    assert got["latency_p50_ms"] == [-60.0, -60.0]  # the errors' 1000 ms and 9 J count nowhere
    assert got["energy_j_per_query"] == [-80.0, -80.0]
    with pytest.raises(ValueError, match="same workload"):
        paired_change_intervals(base, _run("calm", _items(3), [1.0] * 3, [0.1] * 3))


def test_no_replies_give_no_interval() -> None:
    items = _items(4)
    base = _run("single", items, [10.0] * 4, [0.1] * 4)
    other = Run("calm", items, [f"calm-{i}" for i in range(4)], {}, 0.0, 1.0)
    assert paired_change_intervals(base, other)["latency_p50_ms"] == [None, None]


def test_comparison_and_markdown_carry_the_intervals() -> None:
    items = _items(30)
    runs = {"single": _run("single", items, [20.0] * 30, [0.4] * 30),
            "calm": _run("calm", items, [8.0] * 30, [0.1] * 30)}
    reports = {name: strategy_report(run, []) for name, run in runs.items()}
    change = comparison(reports, runs=runs)
    assert change["calm"]["intervals"]["latency_p50_ms"] == [-60.0, -60.0]
    assert "intervals" not in comparison(reports)["calm"]
    text = markdown({"strategies": reports, "comparison": change, "fleet": {}, "machine": {}})
    assert "`calm` against `single`: Δp50 -60.0% (-60.0 to -60.0 %), ΔJ -75.0% (-75.0 to -75.0 %)." in text


@pytest.mark.parametrize("n", [1, 2, 7, 40, 41])
def test_the_bootstrap_medians_are_the_reports_percentile(n: int) -> None:
    from calm.report import _nearest_rank_medians

    rng = np.random.default_rng(n)
    rows = rng.uniform(1, 100, size=(30, n))
    rows[rng.uniform(size=rows.shape) < 0.2] = np.nan  # failed queries
    for row, got in zip(rows, _nearest_rank_medians(rows), strict=True):
        kept = [float(v) for v in row if not np.isnan(v)]
        if kept:
            assert got == pytest.approx(percentile(kept, 50), abs=1e-3)
        else:
            assert np.isnan(got)


def test_resamples_without_an_ok_reply_are_dropped_quietly() -> None:
    import warnings

    items = _items(20)
    base = _run("single", items, [10.0] * 20, [0.1] * 20)
    other = _run("calm", items, [4.0] * 20, [0.02] * 20)
    for qid in other.ids[1:]:  # one ok reply: about a third of the resamples miss it
        other.replies[qid] = {"status": "error"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = paired_change_intervals(base, other)
    assert got["latency_p50_ms"] == [-60.0, -60.0]
    assert got["energy_j_per_query"] == [-80.0, -80.0]
