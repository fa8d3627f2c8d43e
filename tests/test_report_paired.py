"""The bench report's paired quality comparison and route split, from recorded replies."""

from __future__ import annotations

import math
import statistics

import pytest

from calm.loadgen import Run
from calm.report import comparison, markdown, paired_quality, route_split, strategy_report
from calm.workload import Item


def _items(n: int) -> list[Item]:
    return [Item(t=i * 0.1, domain="arithmetic", prompt=f"{i}+1=", reference=str(i + 1), max_new_tokens=4)
            for i in range(n)]


def _run(strategy: str, items: list[Item], answers: list[str]) -> Run:
    ids = [f"{strategy}-{i}" for i in range(len(items))]
    replies = {qid: {"status": "ok", "text": text, "model": "m", "latency_ms": "5", "route_ms": "2",
                     "energy_j": "0.1", "cached": "0"} for qid, text in zip(ids, answers, strict=True)}
    return Run(strategy, items, ids, replies, 0.0, 1000.0)


def test_paired_quality_is_the_mean_per_query_difference_with_its_interval() -> None:
    items = _items(20)
    right = [i.reference for i in items]
    base = _run("single", items, right)
    # 5 of 20 wrong: each query's difference is 0 or -1, so the mean is -0.25 and the se is sd/sqrt(20).
    other = _run("calm", items, ["x" if i < 5 else r for i, r in enumerate(right)])
    got = paired_quality(base, other)["arithmetic"]
    diffs = [-1.0] * 5 + [0.0] * 15
    se = statistics.stdev(diffs) / math.sqrt(20)
    assert got["n"] == 20
    assert got["diff"] == pytest.approx(-0.25)
    assert got["se"] == pytest.approx(se, abs=1e-4)
    assert got["ci95"] == pytest.approx([-0.25 - 1.96 * se, -0.25 + 1.96 * se], abs=1e-4)
    assert got["verdict"] == "lower"


def test_a_difference_the_interval_spans_zero_on_is_not_called_lower() -> None:
    items = _items(20)
    right = [i.reference for i in items]
    # calm loses one query and wins another: mean 0, interval around it.
    base = _run("single", items, ["x" if i == 0 else r for i, r in enumerate(right)])
    other = _run("calm", items, ["x" if i == 1 else r for i, r in enumerate(right)])
    got = paired_quality(base, other)["arithmetic"]
    assert got["diff"] == 0.0
    assert got["ci95"][0] < 0 < got["ci95"][1]
    assert got["verdict"] == "no difference found"


def test_a_missing_reply_scores_zero_and_different_workloads_are_refused() -> None:
    items = _items(4)
    base = _run("single", items, [i.reference for i in items])
    other = _run("calm", items, [i.reference for i in items])
    del other.replies[other.ids[0]]
    assert paired_quality(base, other)["arithmetic"]["diff"] == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="same workload"):
        paired_quality(base, _run("calm", _items(3), ["1", "2", "3"]))


def test_comparison_and_markdown_carry_the_paired_figures() -> None:
    items = _items(10)
    runs = {"single": _run("single", items, [i.reference for i in items]),
            "calm": _run("calm", items, ["x"] * 10)}
    reports = {name: strategy_report(run, []) for name, run in runs.items()}
    change = comparison(reports, runs=runs)
    paired = change["calm"]["domains"]["arithmetic"]["quality_paired"]
    assert paired["diff"] == -1.0 and paired["verdict"] == "lower"
    assert "quality_paired" not in comparison(reports)["calm"]["domains"]["arithmetic"]
    text = markdown({"strategies": reports, "comparison": change, "fleet": {}, "machine": {}})
    assert "| calm | arithmetic | 10 | -1.000 |" in text


def test_route_split_stages_come_from_the_reply_marks() -> None:
    marks = {"at_monitor_ms": "1.0", "at_embedded_ms": "4.0", "at_analyzer_ms": "5.5", "at_planner_ms": "6.0",
             "route_ms": "7.5"}
    ok = [{"reply": {"status": "ok", "cached": "0", **marks}},
          {"reply": {"status": "ok", "cached": "1", **marks, "route_ms": "99"}},  # a cache hit ran no model
          {"reply": {"status": "ok", "cached": "0", "route_ms": "50"}}]  # no marks (an older actor): left out
    assert route_split(ok) == {"claim": 1.0, "embed": 3.0, "analyze": 1.5, "plan": 0.5, "dispatch": 1.5}
    assert route_split([]) == dict.fromkeys(("claim", "embed", "analyze", "plan", "dispatch"))
