"""Scoring answers per domain (fast; no torch)."""

from __future__ import annotations

import pytest

from workers.fleet.quality import aggregate, metric_for, score


def test_exact_match_domains_compare_stripped_strings() -> None:
    assert score("arithmetic", "85", "85") == 1.0
    assert score("arithmetic", " 85\n", "85") == 1.0
    assert score("arithmetic", "86", "85") == 0.0
    assert score("sorting", " 3 5 9", "3 5 9") == 1.0
    assert score("sorting", "3 9 5", "3 5 9") == 0.0
    assert metric_for("arithmetic") == metric_for("sorting") == "exact_match"


def test_chrf_for_continuations() -> None:
    ref = "    return self._value\n\n    def close(self):\n        self._fh.close()\n"
    assert score("code", ref, ref) == pytest.approx(100.0)
    # text past the reference's length is not judged
    assert score("code", ref + "more text the model kept writing", ref) == pytest.approx(100.0)
    close = score("code", ref.replace("close", "flush"), ref)
    far = score("code", "SELECT * FROM users WHERE id = 1;", ref)
    assert 0.0 <= far < close < 100.0
    assert metric_for("prose") == metric_for("code") == "chrf"


def test_aggregate_is_the_mean_under_the_metric_name() -> None:
    assert aggregate("arithmetic", [1.0, 0.0, 1.0, 1.0]) == {"exact_match": 0.75, "exact_match_se": 0.25}
    assert aggregate("prose", [40.0, 60.0]) == {"chrf": 50.0, "chrf_se": 10.0}
    assert aggregate("sorting", [1.0]) == {"exact_match": 1.0}
    assert aggregate("sorting", []) == {"exact_match": 0.0}
