"""Ingress validation against the contract's table of query fields."""

from __future__ import annotations

import math

import pytest

from broker.config import IngressSettings
from broker.errors import ValidationError
from broker.ingress import entry_ms, parse_query, query_id, reply_stream
from broker.messages import Query
from broker.names import Names

NAMES = Names("calm:")
LIMITS = IngressSettings()
ENTRY = "1700000000123-4"


def _parse(**values: object) -> Query:
    return parse_query(values, ENTRY, NAMES, LIMITS)


def test_defaults_follow_the_contract() -> None:
    q = _parse(prompt="hello")
    assert q.prompt == "hello"
    assert q.id == ENTRY
    assert q.entry_id == ENTRY
    assert q.reply_to == "calm:replies"
    assert q.max_new_tokens == 64
    assert q.temperature == 0.0
    assert q.model is None
    assert q.slo_latency_ms is None and q.slo_energy_j is None and q.min_quality is None
    assert q.arrived_ms == 1700000000123.0


def test_explicit_fields_as_plain_strings() -> None:
    q = _parse(prompt="p", id="client.id:1_x-Y", reply_to="calm:replies:me", max_new_tokens="1024",
               temperature="0.7", model="tiny-math")
    assert q.id == "client.id:1_x-Y"
    assert q.reply_to == "calm:replies:me"
    assert q.max_new_tokens == 1024
    assert q.temperature == pytest.approx(0.7)
    assert q.model == "tiny-math"


def test_native_types_from_msgpack_are_accepted() -> None:
    q = _parse(prompt="p", max_new_tokens=1, temperature=2, slo_latency_ms=250)
    assert q.max_new_tokens == 1
    assert q.temperature == 2.0
    assert q.slo_latency_ms == 250.0


@pytest.mark.parametrize("model", ["auto", "calm", ""])
def test_auto_model_means_calm_chooses(model: str) -> None:
    assert _parse(prompt="p", model=model).model is None


def test_empty_numeric_fields_take_defaults() -> None:
    q = _parse(prompt="p", max_new_tokens="", temperature="", slo_latency_ms="")
    assert q.max_new_tokens == 64
    assert q.temperature == 0.0
    assert q.slo_latency_ms is None


def test_valid_slo_fields_are_parsed() -> None:
    q = _parse(prompt="p", slo_latency_ms="250", slo_energy_j="0.5", min_quality="0.8")
    assert q.slo_latency_ms == 250.0
    assert q.slo_energy_j == 0.5
    assert q.min_quality == 0.8


def test_prompt_at_exactly_the_limit_is_accepted() -> None:
    prompt = "é" * (LIMITS.max_prompt_bytes // 2)  # two bytes each: exactly the limit
    assert len(prompt.encode()) == LIMITS.max_prompt_bytes
    assert _parse(prompt=prompt).prompt == prompt


def test_prompt_limit_is_configurable() -> None:
    with pytest.raises(ValidationError, match="over the limit of 10"):
        parse_query({"prompt": "x" * 11}, ENTRY, NAMES, IngressSettings(max_prompt_bytes=10))


def test_max_new_tokens_limit_is_configurable() -> None:
    limits = IngressSettings(default_max_new_tokens=8, max_new_tokens_limit=16)
    assert parse_query({"prompt": "p"}, ENTRY, NAMES, limits).max_new_tokens == 8
    with pytest.raises(ValidationError, match=r"1\.\.16"):
        parse_query({"prompt": "p", "max_new_tokens": "17"}, ENTRY, NAMES, limits)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({}, "missing field 'prompt'"),
        ({"prompt": ""}, "'prompt' is empty"),
        ({"prompt": "  \n\t"}, "'prompt' is empty"),
        ({"prompt": 12}, "'prompt' must be a string"),
        ({"prompt": b"bytes"}, "'prompt' must be a string"),
        ({"prompt": "é" * (16 * 1024 + 1)}, "32770 bytes, over the limit of 32768"),
        ({"prompt": "x" * (32 * 1024 + 1)}, "over the limit"),
        ({"prompt": "p", "id": "has space"}, "'id'"),
        ({"prompt": "p", "id": "semi;colon"}, "'id'"),
        ({"prompt": "p", "id": ""}, "'id'"),
        ({"prompt": "p", "id": "x" * 129}, "'id'"),
        ({"prompt": "p", "id": 17}, "'id'"),
        ({"prompt": "p", "reply_to": "other:stream"}, "'reply_to'.*calm:replies"),
        ({"prompt": "p", "reply_to": "calm:queries"}, "'reply_to'"),
        ({"prompt": "p", "reply_to": ""}, "'reply_to'"),
        ({"prompt": "p", "reply_to": "calm:replies" + "x" * 300}, "'reply_to'"),
        ({"prompt": "p", "max_new_tokens": "0"}, "'max_new_tokens'.*1..1024"),
        ({"prompt": "p", "max_new_tokens": 0}, "'max_new_tokens'"),
        ({"prompt": "p", "max_new_tokens": "1025"}, "'max_new_tokens'.*got 1025"),
        ({"prompt": "p", "max_new_tokens": "-5"}, "'max_new_tokens'"),
        ({"prompt": "p", "max_new_tokens": "abc"}, "'max_new_tokens' must be an integer"),
        ({"prompt": "p", "max_new_tokens": "1.5"}, "'max_new_tokens'"),
        ({"prompt": "p", "max_new_tokens": 1.5}, "'max_new_tokens'"),
        ({"prompt": "p", "max_new_tokens": True}, "'max_new_tokens'"),
        ({"prompt": "p", "temperature": "-1"}, "'temperature'.*0..2"),
        ({"prompt": "p", "temperature": "3"}, "'temperature'"),
        ({"prompt": "p", "temperature": "nan"}, "'temperature'"),
        ({"prompt": "p", "temperature": math.nan}, "'temperature'"),
        ({"prompt": "p", "temperature": "inf"}, "'temperature'"),
        ({"prompt": "p", "temperature": "warm"}, "'temperature' must be a number"),
        ({"prompt": "p", "min_quality": "2"}, "'min_quality'"),
        ({"prompt": "p", "min_quality": "-0.1"}, "'min_quality'"),
        ({"prompt": "p", "slo_latency_ms": "-1"}, "'slo_latency_ms'"),
        ({"prompt": "p", "slo_energy_j": "lots"}, "'slo_energy_j'"),
        ({"prompt": "p", "model": "no spaces allowed"}, "'model'"),
        ({"prompt": "p", "model": "../etc"}, "'model'"),
        ({"prompt": "p", "model": 5}, "'model'"),
    ],
)
def test_rejections_raise_validation_error_with_a_clear_message(values: dict[str, object], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        parse_query(values, ENTRY, NAMES, LIMITS)


def test_id_of_128_allowed_characters_is_accepted() -> None:
    ident = ("aZ09._:-" * 16)[:128]
    assert _parse(prompt="p", id=ident).id == ident


def test_reply_to_follows_the_prefix() -> None:
    names = Names("other:")
    q = parse_query({"prompt": "p"}, ENTRY, names, LIMITS)
    assert q.reply_to == "other:replies"
    with pytest.raises(ValidationError, match="other:replies"):
        parse_query({"prompt": "p", "reply_to": "calm:replies"}, ENTRY, names, LIMITS)


def test_helpers_used_to_label_rejections() -> None:
    assert reply_stream({}, NAMES) == "calm:replies"
    assert reply_stream({"reply_to": "calm:replies:x"}, NAMES) == "calm:replies:x"
    assert reply_stream({"reply_to": "elsewhere"}, NAMES) is None
    assert query_id({"id": "good-id"}, ENTRY) == "good-id"
    assert query_id({"id": "bad id"}, ENTRY) == ENTRY
    assert query_id({}, ENTRY) == ENTRY


def test_arrived_ms_comes_from_the_entry_id() -> None:
    assert entry_ms("1700000000123-0") == 1700000000123.0
    assert entry_ms("5-99") == 5.0
    assert entry_ms("garbage") == 0.0
    assert parse_query({"prompt": "p"}, "42-7", NAMES, LIMITS).arrived_ms == 42.0
