"""Wire formats: internal messages round-trip; bad payloads raise DecodeError with the entry id."""

from __future__ import annotations

import msgpack
import msgspec
import pytest
import redis.asyncio as aioredis

from broker.codec import PAYLOAD_FIELD, decode, decode_as, encode, ingress_fields, plain_fields
from broker.errors import DecodeError
from broker.messages import (
    SCHEMA_VERSION,
    Candidate,
    Control,
    Decision,
    Embedded,
    Inflight,
    Planned,
    Query,
    Result,
    Scored,
    Telemetry,
    WantModel,
    Work,
    WorkerEvent,
)
from broker.names import Names

QUERY = Query(
    id="q-1", entry_id="1700000000000-0", prompt="what is 2+2?", reply_to="calm:replies:me", max_new_tokens=32,
    temperature=0.7, model="tiny-math", slo_latency_ms=500.0, slo_energy_j=None, min_quality=0.6,
    arrived_ms=1700000000000.0,
)
CANDIDATE = Candidate(model="tiny-math", fit=0.9, latency_ms=120.5, energy_j=0.4, quality=0.7, error_rate=0.01,
                      loaded=True, queue=2)
DECISION = Decision(model="tiny-math", reason="highest utility", utility=0.8, slo_met=False, explored=True)

ALL_MESSAGES = [
    Embedded(query=QUERY, embedding=b"\x00\x00\x80?" * 4, stamps={"monitor": 1.5}),
    Scored(query=QUERY, candidates=[CANDIDATE, CANDIDATE], domain="math", stamps={"a": 1.0}),
    Planned(query=QUERY, decision=DECISION, domain="math"),
    Embedded(query=QUERY, embedding=b"", exact_hit=b"\x81\xa4text\xa219"),
    Scored(query=QUERY, candidates=[], domain="math", exact_hit=b"\x81\xa4text\xa219"),
    Planned(query=QUERY, decision=DECISION, exact_hit=b"\x81\xa4text\xa219"),
    Work(id="q-1", attempt=2, model="tiny-math", prompt="p", max_new_tokens=8, temperature=0.0, dispatched_ms=5.0,
         seed=42),
    Result(id="q-1", attempt=1, model="m", worker="w1", ok=False, text="", error="boom", tokens_in=3,
           tokens_out=0, queue_ms=1.0, inference_ms=2.0, energy_j=0.1, energy_source="rapl", confidence=0.3,
           finish_reason="error"),
    Telemetry(model="m", worker="w1", ok=True, inference_ms=10.0, queue_ms=1.0, tokens_out=5, energy_j=0.2,
              confidence=0.9, at_ms=1.0),
    Control(action="evict", model="m", reason="lru", at_ms=3.0),
    WantModel(model="m", query_id="q-1", at_ms=4.0),
    WorkerEvent(worker="w1", event="loaded", model="m", detail="ok", memory_mb=512.5, at_ms=6.0),
    Inflight(query=QUERY, decision=DECISION, domain="math", attempt=2, dispatched_ms=7.0, stamps={"x": 2.0}),
]


def _kind(message: object) -> str:
    return type(message).__name__


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=_kind)
def test_every_message_kind_round_trips(message) -> None:
    fields = encode(message)
    assert list(fields) == [PAYLOAD_FIELD]
    decoded = decode(fields, "1-0")
    assert type(decoded) is type(message)
    assert decoded == message
    assert decoded.v == SCHEMA_VERSION
    assert decode_as(type(message), fields, "1-0") == message


def test_every_kind_of_the_union_is_covered() -> None:
    from broker.messages import AnyMessage

    assert {t.__name__ for t in AnyMessage.__args__} == {_kind(m) for m in ALL_MESSAGES}


def test_defaults_are_omitted_and_restored() -> None:
    small = Control(action="load", model="m")
    raw = encode(small)[PAYLOAD_FIELD]
    assert set(msgspec.msgpack.decode(raw)) == {"kind", "action", "model"}  # v and defaults omitted
    assert decode({PAYLOAD_FIELD: raw}) == small


async def test_round_trip_through_a_real_stream(aclient: aioredis.Redis, names: Names) -> None:
    stream = f"{names.prefix}codec"
    for message in ALL_MESSAGES:
        await aclient.xadd(stream, encode(message))
    entries = await aclient.xrange(stream)
    decoded = [decode(fields, entry_id.decode(), stream) for entry_id, fields in entries]
    assert decoded == ALL_MESSAGES


def _raw(payload: dict) -> dict[bytes, bytes]:
    return {PAYLOAD_FIELD: msgspec.msgpack.encode(payload)}


def test_wrong_schema_version_is_refused() -> None:
    fields = encode(Control(action="load", model="m", v=SCHEMA_VERSION + 1))
    with pytest.raises(DecodeError, match="schema version") as info:
        decode(fields, "5-1", "calm:sched")
    assert info.value.entry_id == "5-1"
    assert info.value.stream == "calm:sched"


@pytest.mark.parametrize(
    "fields",
    [
        {PAYLOAD_FIELD: b"\xc1\xff garbage"},
        {PAYLOAD_FIELD: b""},
        {PAYLOAD_FIELD: msgspec.msgpack.encode([1, 2, 3])},
        {PAYLOAD_FIELD: msgspec.msgpack.encode({"kind": "no-such-kind", "model": "m"})},
        {PAYLOAD_FIELD: msgspec.msgpack.encode({"model": "m", "action": "load"})},  # no kind tag
        {PAYLOAD_FIELD: msgspec.msgpack.encode({"kind": "control", "action": "load"})},  # missing model
        {PAYLOAD_FIELD: msgspec.msgpack.encode({"kind": "control", "action": 3, "model": "m"})},  # wrong type
    ],
    ids=["garbage", "empty", "array", "unknown-kind", "no-kind", "missing-field", "wrong-type"],
)
def test_bad_payloads_raise_decode_error_with_entry_id(fields: dict[bytes, bytes]) -> None:
    with pytest.raises(DecodeError, match="bad message payload") as info:
        decode(fields, "9-3", "calm:plan")
    assert info.value.entry_id == "9-3"
    assert info.value.stream == "calm:plan"


def test_missing_payload_field() -> None:
    with pytest.raises(DecodeError, match="'m'") as info:
        decode({b"prompt": b"hello"}, "2-0")
    assert info.value.entry_id == "2-0"
    with pytest.raises(DecodeError):
        decode({}, "2-1")


def test_decode_as_wrong_kind() -> None:
    fields = encode(Control(action="load", model="m"))
    with pytest.raises(DecodeError, match="expected Work, got Control") as info:
        decode_as(Work, fields, "7-7")
    assert info.value.entry_id == "7-7"


def test_decode_error_is_a_value_error_with_the_reason() -> None:
    with pytest.raises(ValueError, match="no 'm' payload"):
        decode({}, "1-1")


# -- ingress -------------------------------------------------------------------------


def test_ingress_plain_utf8_fields() -> None:
    fields = {b"prompt": "¿qué es π?".encode(), b"id": b"abc", b"max_new_tokens": b"12"}
    assert ingress_fields(fields, "1-0") == {"prompt": "¿qué es π?", "id": "abc", "max_new_tokens": "12"}


def test_ingress_single_msgpack_field_map() -> None:
    packed = msgpack.packb({"prompt": "hi", "max_new_tokens": 5, "temperature": 0.5, "model": None})
    assert ingress_fields({b"msgpack": packed}, "1-0") == {
        "prompt": "hi", "max_new_tokens": 5, "temperature": 0.5, "model": None,
    }


def test_ingress_plain_fields_beside_msgpack_win() -> None:
    packed = msgpack.packb({"prompt": "from msgpack", "id": "a"})
    out = ingress_fields({b"msgpack": packed, b"prompt": b"plain"}, "1-0")
    assert out == {"prompt": "plain", "id": "a"}


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({b"prompt": b"\xff\xfe bad"}, "UTF-8"),
        ({b"\xff": b"x"}, "UTF-8"),
        ({b"msgpack": b"\xc1"}, "not valid msgpack"),
        ({b"msgpack": msgpack.packb({"prompt": "x"}) + b"\x00"}, "not valid msgpack"),  # trailing bytes
        ({b"msgpack": msgpack.packb([1, 2])}, "must hold a map"),
        ({b"msgpack": msgpack.packb("prompt")}, "must hold a map"),
    ],
    ids=["bad-value", "bad-key", "garbage", "trailing", "array", "string"],
)
def test_ingress_bad_fields_raise_decode_error(fields: dict[bytes, bytes], match: str) -> None:
    with pytest.raises(DecodeError, match=match) as info:
        ingress_fields(fields, "4-2", "calm:queries")
    assert info.value.entry_id == "4-2"
    assert info.value.stream == "calm:queries"


# -- egress --------------------------------------------------------------------------


def test_plain_fields_formatting() -> None:
    out = plain_fields({
        "ok": True, "no": False, "none": None, "int": 42, "zero": 0, "str": "text",
        "f1": 1.5, "f2": 2.0, "f3": 0.1234567, "f0": 0.0, "big": 100.0, "neg": -0.25, "nan": float("nan"),
    })
    assert out == {
        "ok": "1", "no": "0", "none": "", "int": "42", "zero": "0", "str": "text",
        "f1": "1.5", "f2": "2", "f3": "0.123", "f0": "0", "big": "100", "neg": "-0.25", "nan": "nan",
    }
    assert all(isinstance(v, str) for v in out.values())
