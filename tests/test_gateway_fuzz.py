"""Fuzzing the gateway: any HTTP request is a valid query or a 4xx in OpenAI's error shape, never a crash."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.config import IngressSettings, Settings
from broker.names import Names
from calm.gateway.errors import ApiError
from calm.gateway.openai_api import AUTO_MODELS, QueryRequest, parse_request
from tests.gatewaystub import StubPipeline, running_stub
from tests.test_gateway import serving

NAMES = Names("calm:")
LIMITS = IngressSettings()
PURE_CASES = 5_000
LIVE_CASES = 300
ERROR_KEYS = {"message", "type", "param", "code"}
KEYS = ("model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "stream",
        "stream_options", "stop", "n", "tools", "logprobs", "response_format", "slo_latency_ms", "slo_energy_j",
        "min_quality", "user", "seed")

# Text as JSON can carry it: any code point, lone surrogates included (json.loads accepts "\ud800").
any_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=40)
nasty_text = st.one_of(any_text, st.sampled_from(
    ["", " ", "calm", "auto", "arith", "x/y", "1+1=", "sort 9 3 5 =", "\ud800", "a\udfff", "\x00", "gpt-4",
     "x" * (LIMITS.max_prompt_bytes + 1), "é" * (LIMITS.max_prompt_bytes // 2 + 1)]))
numbers = st.one_of(st.integers(-(10**30), 10**30), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, 2, 64, 1024, 1025, -1, 0.5, 2.0000001, True, False]))
json_values = st.recursive(st.one_of(st.none(), st.booleans(), numbers, nasty_text),
                           lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                   st.dictionaries(nasty_text, inner, max_size=4)), max_leaves=12)
messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "robot", ""]),
                           "content": st.one_of(nasty_text, st.lists(st.one_of(
                               st.fixed_dictionaries({"type": st.just("text"), "text": nasty_text}),
                               json_values), max_size=3), json_values)}),
    json_values), max_size=4)
bodies = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6),
    st.fixed_dictionaries({"model": st.one_of(st.sampled_from(["calm", "auto", "arith"]), nasty_text)},
                          optional={"messages": messages, "prompt": st.one_of(nasty_text, st.lists(nasty_text,
                                                                                                    max_size=70)),
                                    "max_tokens": numbers, "temperature": numbers, "stop": json_values,
                                    "stream": json_values, "n": numbers, "tools": json_values,
                                    "stream_options": json_values, "min_quality": numbers}),
)


def _check_valid(request: QueryRequest) -> None:
    assert request.prompts and all(isinstance(p, str) and p.strip() for p in request.prompts)
    assert all(len(p.encode("utf-8")) <= LIMITS.max_prompt_bytes for p in request.prompts)
    assert all(isinstance(v, str) for v in request.fields.values())
    assert request.fields["model"] == "auto" or request.model not in AUTO_MODELS
    assert 1 <= int(request.fields.get("max_new_tokens", "1")) <= LIMITS.max_new_tokens_limit
    assert 0 <= float(request.fields.get("temperature", "0")) <= 2


def _check_error(e: ApiError) -> None:
    assert e.status == 400
    body = e.body()["error"]
    assert set(body) == ERROR_KEYS and body["type"] == "invalid_request_error"
    assert isinstance(body["message"], str) and body["message"]
    assert body["param"] is None or isinstance(body["param"], str)


@settings(max_examples=PURE_CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["chat", "text"]), bodies)
def test_any_body_parses_or_is_a_400_in_openai_shape(kind: str, body: Any) -> None:
    try:
        request = parse_request(kind, body, "fuzz-1", NAMES, LIMITS)
    except ApiError as e:
        _check_error(e)
        return
    _check_valid(request)


def test_a_lone_surrogate_in_a_prompt_is_a_400_not_a_500() -> None:
    """Found by the fuzz above: JSON may hold "\\ud800", which cannot be encoded for the query stream."""
    body = {"model": "calm", "messages": [{"role": "user", "content": "1+1=\ud800"}]}
    with pytest.raises(ApiError) as info:
        parse_request("chat", body, "fuzz-1", NAMES, LIMITS)
    assert info.value.status == 400 and info.value.param == "messages"


# -- live: raw HTTP against a running gateway (and a stub pipeline on a real Redis) ---------------------
def _mutate(rng: random.Random, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with one to three keys replaced by odd values or removed."""
    odd: list[Any] = [None, "", "x" * 40_000, -1, 0, 10**20, 1e308, "1", [], {}, [1, "a"], True, "\ud800",
                      {"role": "user"}, [{"role": "user", "content": 5}], "sort 3 1 ="]
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(KEYS)
        if rng.random() < 0.2:
            body.pop(key, None)
        else:
            body[key] = rng.choice(odd)
    return body


def live_cases(seed: int, count: int) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(method, path, body bytes, headers) for ``count`` mostly-bad requests, seeded."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        path = rng.choice(["/v1/chat/completions", "/v1/completions"])
        base: dict[str, Any] = ({"model": "calm", "messages": [{"role": "user", "content": f"{i}+1="}]}
                                if path.endswith("chat/completions") else {"model": "calm", "prompt": f"{i}+1="})
        headers: dict[str, str] = {"Content-Type": "application/json"}
        kind = i % 6
        method = "POST"
        if kind == 0:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
        elif kind == 1:
            body = json.dumps(base)[: rng.randrange(1, 20)].encode()  # truncated JSON
        elif kind in (2, 3):
            body = json.dumps(_mutate(rng, base)).encode("utf-8", "surrogatepass")
        elif kind == 4:
            headers["Idempotency-Key"] = rng.choice(["", " ", "a" * 200, "bad key", "ключ", "x\ty", "ok-1:2"])
            body = json.dumps(base).encode()
        else:
            method, path = rng.choice([("GET", "/v1/chat/completions"), ("POST", "/v1/nope"), ("PUT", "/v1/models"),
                                       ("POST", "/v1/models/x")])
            body = b"{}"
        cases.append((method, path, body, headers))
    return cases


@pytest.fixture
async def gateway(aclient: aioredis.Redis, settings: Settings, redis_url: str) -> AsyncIterator[tuple[str,
                                                                                                        StubPipeline]]:
    async with running_stub(aclient, settings) as stub, serving(settings, redis_url, timeout_s=5.0) as url:
        yield url, stub


async def test_live_fuzz_every_request_is_answered_and_service_continues(
        gateway: tuple[str, StubPipeline]) -> None:
    url, _stub = gateway
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession() as http:
        for method, path, body, headers in live_cases(seed=3, count=LIVE_CASES):
            async with http.request(method, url + path, data=body, headers=headers) as r:
                statuses[r.status] = statuses.get(r.status, 0) + 1
                assert r.status < 500 and r.status != 504, (method, path, body[:200], r.status, await r.text())
                if r.status != 200:
                    error = (await r.json())["error"]
                    assert set(error) == ERROR_KEYS and error["message"], (body[:200], error)
        big = b'{"model": "calm", "prompt": "' + b"x" * (5 * 2**20) + b'"}'
        async with http.post(f"{url}/v1/completions", data=big, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 413 and set((await r.json())["error"]) == ERROR_KEYS
        async with http.post(f"{url}/v1/completions", json={"model": "calm", "prompt": "2+2="}) as r:
            assert r.status == 200 and (await r.json())["choices"][0]["text"] == "echo:2+2="
    print(f"live gateway fuzz: {LIVE_CASES} requests, statuses {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) == LIVE_CASES
