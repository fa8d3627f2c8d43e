"""The overhead bench's saturated cache-hit rate, computed from the replies' own times."""

from __future__ import annotations

import pytest

from calm.bench.overhead import saturated_rate


def test_saturated_rate_spans_first_to_last_reply() -> None:
    # All sent at t=1000 ms; replies leave the executor 10, 20, ..., 50 ms later: 4 replies in 40 ms.
    arrived = {f"q{i}": 1000.0 for i in range(5)}
    replies = {f"q{i}": {"status": "ok", "latency_ms": str(10.0 * (i + 1))} for i in range(5)}
    assert saturated_rate(arrived, replies) == pytest.approx(100.0)


def test_saturated_rate_uses_each_querys_arrival() -> None:
    # Arrivals spread by the client's sending: reply time is arrival + latency, not latency alone.
    arrived = {"a": 0.0, "b": 100.0, "c": 200.0}
    replies = {q: {"status": "ok", "latency_ms": "5"} for q in arrived}
    assert saturated_rate(arrived, replies) == pytest.approx(2 / 0.2)


def test_saturated_rate_ignores_failed_and_unknown_replies_and_needs_two() -> None:
    arrived = {"a": 0.0, "b": 0.0}
    replies = {"a": {"status": "ok", "latency_ms": "1"}, "b": {"status": "error", "latency_ms": "9"},
               "stray": {"status": "ok", "latency_ms": "50"}}
    assert saturated_rate(arrived, replies) is None
    assert saturated_rate({"a": 0.0, "b": 0.0}, {q: {"status": "ok", "latency_ms": "3"} for q in "ab"}) is None
