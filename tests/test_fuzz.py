"""Fuzzing the ingress: any entry is either a valid query or a clear rejection, never a crash."""

from __future__ import annotations

import random
from pathlib import Path

import msgpack
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.codec import ingress_fields
from broker.config import IngressSettings
from broker.errors import DecodeError, ValidationError
from broker.ingress import parse_query
from broker.names import Names
from tests.calmproc import calm_up, collect

NAMES = Names("calm:")
LIMITS = IngressSettings()
FIELDS = ("prompt", "id", "reply_to", "max_new_tokens", "temperature", "model", "slo_latency_ms", "slo_energy_j",
          "min_quality", "unknown", "msgpack")

nasty_text = st.one_of(
    st.text(max_size=64), st.sampled_from(["", " ", "0", "-1", "1e309", "nan", "inf", "1025", "auto", "calm:replies",
                                           "calm:repliesX", "elsewhere", "'; DROP TABLE x; --", "$(rm -rf /)",
                                           "\x00", "{prompt}", "a" * 200]),
)
INTS = st.integers(-(2**63), 2**63 - 1)  # what msgpack can encode
raw_values = st.one_of(nasty_text.map(lambda s: s.encode("utf-8")), st.binary(max_size=64),
                       st.just(b"x" * (LIMITS.max_prompt_bytes + 1)))
packed = st.one_of(
    st.binary(max_size=32),
    st.dictionaries(st.sampled_from(FIELDS[:-1]), st.one_of(INTS, st.floats(), nasty_text, st.none(),
                                                             st.lists(INTS, max_size=3)), max_size=6)
    .map(lambda d: msgpack.packb(d)),
    st.lists(INTS, max_size=3).map(lambda v: msgpack.packb(v)),
)
entries = st.dictionaries(st.sampled_from(FIELDS[:-1]).map(str.encode), raw_values, max_size=8).flatmap(
    lambda d: st.one_of(st.just(d), packed.map(lambda p: {**d, b"msgpack": p})))


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries)
def test_any_entry_parses_or_is_rejected_with_a_reason(fields: dict[bytes, bytes]) -> None:
    try:
        values = ingress_fields(fields, "1-0", "calm:queries")
        query = parse_query(values, "1-0", NAMES, LIMITS)
    except (DecodeError, ValidationError) as e:
        assert str(e), "every rejection says why"
        return
    assert query.prompt.strip() and len(query.prompt.encode()) <= LIMITS.max_prompt_bytes
    assert 1 <= query.max_new_tokens <= LIMITS.max_new_tokens_limit
    assert 0 <= query.temperature <= 2
    assert query.reply_to.startswith(NAMES.replies)


@pytest.mark.slow
def test_live_fuzz_every_case_is_answered_and_service_continues(tiny_fleet: Path, redis_url: str,
                                                               prefix: str) -> None:
    rng = random.Random(1)
    client = redis.Redis.from_url(redis_url)
    reply_to = f"{prefix}replies"
    cases = []
    for i in range(200):
        fields: dict[str, bytes | str] = {"id": f"fuzz-{i}", "reply_to": reply_to}
        kind = i % 5
        if kind == 0:
            fields["prompt"] = rng.choice(["", "  ", "x" * 40_000])
        elif kind == 1:
            fields.update(prompt="1+1=", max_new_tokens=rng.choice(["0", "-3", "abc", "1.5", "99999"]))
        elif kind == 2:
            fields.update(prompt="1+1=", temperature=rng.choice(["-1", "9", "nan"]), model=rng.choice(["", "x/y"]))
        elif kind == 3:
            fields["msgpack"] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        else:
            fields.update(prompt=bytes(rng.randrange(128, 256) for _ in range(8)))  # invalid UTF-8
        cases.append(fields)
    with calm_up(redis_url, prefix, tiny_fleet) as calm:
        pids = {a["pid"] for a in calm.status()["actors"].values()}
        for fields in cases:
            client.xadd(f"{prefix}queries", fields)
        client.xadd(f"{prefix}queries", {"prompt": "2+2=", "id": "after-fuzz", "reply_to": reply_to})
        got = collect(client, reply_to, {*(f"fuzz-{i}" for i in range(200)), "after-fuzz"})
        dead = client.xlen(f"{prefix}dead")
        still = {a["pid"] for a in calm.status()["actors"].values()}
    answered = [k for k in got if k.startswith("fuzz-")]
    assert len(answered) == 200 and all(got[k][0]["status"] == "rejected" and got[k][0]["error"] for k in answered)
    assert got["after-fuzz"][0]["status"] == "ok", "service continues"
    assert dead == 200, "every bad entry is dead-lettered with its reason"
    assert pids == still, "no actor crashed"
