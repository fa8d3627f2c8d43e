"""What makes the monitor re-embed a model's routing profile: its card, its exemplars, or another embedder."""

from __future__ import annotations

from dataclasses import replace

from broker.kb import ModelState
from calm_actors.monitor import profile_digest

STATE = ModelState(name="arith", description="adds numbers", examples=("1+1=",), exemplars_digest="e1")


def test_the_digest_follows_the_card_the_exemplars_and_the_embedder() -> None:
    base = profile_digest(STATE, "embedder-a")
    assert profile_digest(replace(STATE, requests=9, latency_ms=3.0), "embedder-a") == base  # QoS: not the profile
    changed = [
        profile_digest(replace(STATE, description="adds two numbers"), "embedder-a"),
        profile_digest(replace(STATE, examples=("2+2=",)), "embedder-a"),
        profile_digest(replace(STATE, exemplars_digest="e2"), "embedder-a"),
        profile_digest(STATE, "embedder-b"),  # a rebuilt embedder: the stored rows are another space's
    ]
    assert len({base, *changed}) == 5
