"""Self-adaptation on the live system: traffic leaves a degraded model and comes back when it recovers."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.calmproc import calm_up, collect, send

pytestmark = pytest.mark.slow

# The tiny fleet's baseline is far below its arithmetic specialist on held-out sums: these tests let it
# stand in (route_to_baseline) and turn the quality floor off, so QoS alone decides.
ADAPTIVE = ("--set=planner.route_to_baseline=true", "--set=planner.quality_tolerance=1",
            "--set=planner.explore_interval_s=2",
            "--set=qos.stale_tau_s=4", "--set=streams.reclaim_idle_ms=2000", "--set=executor.attempt_timeout_s=20")
_counter = itertools.count()
FAULT_PICKUP_S = 1.5  # workers read injected faults with their 1 s heartbeat


def _prompts() -> Iterator[str]:
    for i in itertools.count(100):
        yield f"{i % 90 + 5}+{(i * 7) % 90 + 3}="


def ask(client: redis.Redis, prefix: str, prompt: str) -> dict[str, str]:
    qid = f"adaptive-{next(_counter)}"
    send(client, prefix, prompt=prompt, id=qid, max_new_tokens="4")
    got = collect(client, f"{prefix}replies", {qid}, timeout_s=60)
    assert qid in got, f"no reply to {qid}"
    return got[qid][-1]


def test_traffic_shifts_from_a_slow_model_and_returns(tiny_fleet: Path, redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    prompts = _prompts()
    with calm_up(redis_url, prefix, tiny_fleet, "--workers", "1", *ADAPTIVE):
        healthy = [ask(client, prefix, next(prompts))["model"] for _ in range(6)]
        assert healthy[-3:] == ["arith"] * 3, healthy

        client.hset(f"{prefix}faults:arith", mapping={"delay_ms": "1500"})
        time.sleep(FAULT_PICKUP_S)
        degraded = [ask(client, prefix, next(prompts))["model"] for _ in range(12)]
        first_away = next((i for i, m in enumerate(degraded) if m != "arith"), None)
        assert first_away is not None and first_away <= 6, f"traffic did not leave the slow model: {degraded}"
        assert degraded[-4:].count("arith") <= 1, degraded  # stays away (an exploration probe at most)

        client.delete(f"{prefix}faults:arith")
        time.sleep(FAULT_PICKUP_S)
        recovered = []
        for _ in range(40):
            recovered.append(ask(client, prefix, next(prompts))["model"])
            if recovered[-3:] == ["arith"] * 3:
                break
            time.sleep(0.25)  # spaces the queries out so exploration probes become due
        assert recovered[-3:] == ["arith"] * 3, f"traffic did not come back: {recovered}"


def test_failing_model_is_retried_elsewhere_and_avoided(tiny_fleet: Path, redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    prompts = _prompts()
    with calm_up(redis_url, prefix, tiny_fleet, "--workers", "1", *ADAPTIVE):
        assert ask(client, prefix, next(prompts))["model"] == "arith"
        client.hset(f"{prefix}faults:arith", mapping={"error_rate": "1"})
        time.sleep(FAULT_PICKUP_S)
        replies = [ask(client, prefix, next(prompts)) for _ in range(6)]
        assert all(r["status"] == "ok" for r in replies), replies
        assert replies[0]["model"] != "arith" and int(replies[0]["attempts"]) >= 2, replies[0]
        assert all(r["model"] != "arith" for r in replies[2:]), [r["model"] for r in replies]
        dead = client.xlen(f"{prefix}dead")
        assert dead == 0, "failed attempts that were retried successfully are not dead letters"


def test_repeated_and_paraphrased_queries_come_from_the_cache(tiny_fleet: Path, redis_url: str,
                                                              prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with calm_up(redis_url, prefix, tiny_fleet, "--workers", "1", *ADAPTIVE,
                 "--set=cache.domain_thresholds=arithmetic=0.85"):
        first = ask(client, prefix, "12+7=")
        again = ask(client, prefix, "12+7=")
        spaced = ask(client, prefix, "12 + 7 =")
        other = ask(client, prefix, "12+8=")
        decisions = {f[b"id"].decode(): f for _, f in client.xrange(f"{prefix}decisions")}
        demand = client.hgetall(f"{prefix}demand:{first['model']}")
        # Switched off at run time (calm config set), the exact cache answers nothing: the model runs again.
        client.hset(f"{prefix}config", "cache.exact", "false")
        client.hset(f"{prefix}config", "cache.semantic", "false")
        time.sleep(2.5)  # the monitor and the executor poll the runtime config every second
        uncached = ask(client, prefix, "12+7=")
    assert first["cached"] == "0"
    assert again["cached"] == "1" and again["cache"] == "exact" and again["text"] == first["text"]
    # The monitor found the exact hit: the decision says so, no candidate was scored, no work was dispatched.
    assert decisions[again["id"]][b"reason"] == b"exact cache hit", decisions[again["id"]]
    assert decisions[again["id"]][b"model"].decode() == first["model"]
    assert decisions[again["id"]][b"candidates"] == b"[]"
    assert decisions[first["id"]][b"candidates"] != b"[]"
    # Demand counts the queries planned onto the model, not the exact hit the monitor found.
    planned = [f for f in decisions.values() if f[b"model"].decode() == first["model"]]
    assert sum(int(v) for v in demand.values()) == len(planned) - 1, (demand, planned)
    assert uncached["cached"] == "0" and uncached["model"] == first["model"], uncached
    assert spaced["cached"] == "1" and spaced["cache"] == "semantic" and spaced["text"] == first["text"]
    assert other["cached"] == "0"
    assert float(again["energy_j"]) == 0.0 and again["worker"] == ""


def test_fit_settings_set_at_run_time_reach_the_analyzer(tiny_fleet: Path, redis_url: str, prefix: str) -> None:
    """`calm config set planner.fit_temperature=0 planner.classifier_weight=0`: the analyzer's next fits are the
    raw cosines (before, they are softmax shares sharpened by the classifier)."""
    client = redis.Redis.from_url(redis_url)
    with calm_up(redis_url, prefix, tiny_fleet, "--workers", "1", "--set=cache.exact=false",
                 "--set=cache.semantic=false"):
        before = ask(client, prefix, "12+7=")
        client.hset(f"{prefix}config", mapping={"planner.fit_temperature": "0", "planner.classifier_weight": "0"})
        time.sleep(2.5)  # the analyzer polls the runtime config every second
        after = ask(client, prefix, "12+7=")
        decisions = {f[b"id"].decode(): f for _, f in client.xrange(f"{prefix}decisions")}
    scored_before = json.loads(decisions[before["id"]][b"candidates"])
    scored_after = json.loads(decisions[after["id"]][b"candidates"])
    assert len(scored_before) >= 2 and len(scored_after) == len(scored_before)
    assert any(abs(c["fit"] - c["cosine"]) > 1e-3 for c in scored_before), scored_before
    assert all(c["fit"] == pytest.approx(c["cosine"], abs=2e-4) for c in scored_after), scored_after


def test_a_prompt_cut_for_routing_is_neither_looked_up_in_nor_stored_in_the_semantic_cache(
        tiny_fleet: Path, redis_url: str, prefix: str) -> None:
    """With the router embedding 5 tokens, "12+7=" ([CLS] 12 + 7 = [SEP]) is cut: the spaced paraphrase the test
    above finds in the semantic cache is not found, nothing is stored there, and the exact cache still answers."""
    client = redis.Redis.from_url(redis_url)
    with calm_up(redis_url, prefix, tiny_fleet, "--workers", "1", *ADAPTIVE,
                 "--set=cache.domain_thresholds=arithmetic=0.85", "--set=ingress.embed_tokens=5"):
        first = ask(client, prefix, "12+7=")
        spaced = ask(client, prefix, "12 + 7 =")
        again = ask(client, prefix, "12+7=")
        semantic_entries = client.xlen(f"{prefix}cache:semantic:{first['domain'] or 'any'}")
    assert first["status"] == "ok" and first["cached"] == "0"
    assert spaced["status"] == "ok" and spaced["cached"] == "0", spaced
    assert again["cached"] == "1" and again["cache"] == "exact" and again["text"] == first["text"]
    assert semantic_entries == 0
