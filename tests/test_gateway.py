"""The HTTP gateway through the official ``openai`` client, against a stub pipeline on a real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from broker.config import GatewaySettings, Settings
from calm.gateway.app import build_app
from calm.gateway.openai_api import render_chat
from calm.logs import JsonLines
from tests.gatewaystub import StubPipeline, running_stub

REPLY_FIELDS = ("id", "status", "text", "model", "worker", "cached", "latency_ms", "route_ms", "queue_ms",
                "inference_ms", "tokens_in", "tokens_out", "energy_j", "energy_source", "confidence", "error")


@asynccontextmanager
async def serving(settings: Settings, url: str, **gateway: object) -> AsyncIterator[str]:
    """The gateway on a free port; yields its base URL."""
    settings = dataclasses.replace(settings, gateway=GatewaySettings(**gateway))  # type: ignore[arg-type]
    server = TestServer(build_app(settings, url), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.fixture
async def stub(aclient: aioredis.Redis, settings: Settings) -> AsyncIterator[StubPipeline]:
    async with running_stub(aclient, settings) as pipeline:
        yield pipeline


@pytest.fixture
async def base(stub: StubPipeline, settings: Settings, redis_url: str) -> AsyncIterator[str]:
    async with serving(settings, redis_url, timeout_s=5.0) as url:
        yield url


def sync_client(base: str, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=str(kwargs.pop("api_key", "none")), max_retries=0,
                         **kwargs)  # type: ignore[arg-type]


def async_client(base: str, **kwargs: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=str(kwargs.pop("api_key", "none")), max_retries=0,
                              **kwargs)  # type: ignore[arg-type]


async def in_thread(fn: Callable[[], object]) -> object:
    """Run a blocking (sync client) call off the loop that serves the gateway."""
    return await asyncio.to_thread(fn)


# -- the happy paths -----------------------------------------------------------------
async def test_sync_chat_completion_carries_the_reply_and_the_calm_object(base: str, stub: StubPipeline) -> None:
    with sync_client(base) as client:
        done = await in_thread(lambda: client.chat.completions.create(
            model="calm", messages=[{"role": "user", "content": "37+48="}], max_tokens=16, temperature=0))
    assert isinstance(done, openai.types.chat.ChatCompletion)
    assert done.choices[0].message.content == "echo:37+48="
    assert done.choices[0].finish_reason == "stop"
    assert done.model == "arith"
    assert done.usage is not None and done.usage.completion_tokens == len("echo:37+48=")
    calm = (done.model_extra or {})["calm"]
    for name in REPLY_FIELDS:
        assert name in calm, f"calm object lacks {name}"
    assert calm["status"] == "ok" and calm["worker"] == "stub-w1"
    assert calm["latency_ms"] == pytest.approx(7.5) and calm["cached"] is False
    sent = stub.seen[-1]
    assert sent["prompt"] == "37+48=" and sent["max_new_tokens"] == "16" and sent["model"] == "auto"
    assert sent["reply_to"].startswith(f"{stub.names.replies}:gw-")
    assert done.id == f"chatcmpl-{sent['id']}"


async def test_async_streaming_chat_sends_the_text_then_the_finish_chunk(base: str, stub: StubPipeline) -> None:
    client = async_client(base)
    stream = await client.chat.completions.create(
        model="arith", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2="}],
        stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    prompt = "system: be brief\nuser: 1+2=\nassistant:"
    assert text == f"echo:{prompt}"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert (finals[0].model_extra or {})["calm"]["model"] == "arith"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert stub.seen[-1]["model"] == "arith" and stub.seen[-1]["prompt"] == prompt
    await client.close()


async def test_completions_batch_sync_and_streaming_async(base: str, stub: StubPipeline) -> None:
    with sync_client(base) as client:
        done = await in_thread(lambda: client.completions.create(model="auto", prompt=["12+7=", "sort 9 3 5 ="],
                                                                 max_tokens=8, stop=["3"]))
    assert isinstance(done, openai.types.Completion)
    assert [c.text for c in done.choices] == ["echo:12+7=", "echo:sort 9 "]  # cut at the stop sequence
    assert [c.index for c in done.choices] == [0, 1]
    assert {s["id"] for s in stub.seen[-2:]} == {f"{done.id[len('cmpl-'):]}:0", f"{done.id[len('cmpl-'):]}:1"}
    aclient = async_client(base)
    stream = await aclient.completions.create(model="calm", prompt="90-45=", stream=True)
    texts = [choice.text async for chunk in stream for choice in chunk.choices]
    assert "".join(texts) == "echo:90-45="
    await aclient.close()


async def test_models_lists_calm_and_every_registered_model(base: str) -> None:
    client = async_client(base)
    listed = await client.models.list()
    ids = [m.id for m in listed.data]
    assert ids[0] == "calm" and set(ids[1:]) == {"arith", "sort", "generalist"}
    assert (await client.models.retrieve("sort")).id == "sort"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-model")
    await client.close()


async def test_idempotency_key_makes_concurrent_requests_share_one_query(base: str, stub: StubPipeline) -> None:
    body = {"model": "calm", "messages": [{"role": "user", "content": "5+5="}]}
    async with aiohttp.ClientSession() as http:
        async def post() -> dict:
            async with http.post(f"{base}/v1/chat/completions", json=body,
                                 headers={"Idempotency-Key": "order-42"}) as r:
                assert r.status == 200
                return await r.json()

        first, second = await asyncio.gather(post(), post())
        assert first["id"] == second["id"] == "chatcmpl-order-42"
        assert first["calm"]["id"] == second["calm"]["id"] == "order-42"
        async with http.post(f"{base}/v1/chat/completions", json=body, headers={"Idempotency-Key": "bad key!"}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["param"] == "Idempotency-Key"
    assert [s["id"] for s in stub.seen].count("order-42") == 2


# -- errors --------------------------------------------------------------------------
async def test_bad_requests_are_400_in_openai_shape(base: str, stub: StubPipeline,
                                                     request: pytest.FixtureRequest) -> None:
    client = sync_client(base)
    request.addfinalizer(client.close)
    cases = [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "1+1="}], "max_tokens": 5000}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "1+1="}], "temperature": 3}, "temperature"),
        ({"messages": [{"role": "user", "content": "x" * (33 * 1024)}]}, "messages"),
        ({"messages": [{"role": "user", "content": "1+1="}], "n": 2}, "n"),
    ]
    before = len(stub.seen)
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            await in_thread(lambda extra=extra: client.chat.completions.create(model="calm", **extra))
        assert info.value.status_code == 400
        body = info.value.body
        assert isinstance(body, dict) and body["param"] == param and body["type"] == "invalid_request_error"
    assert len(stub.seen) == before, "rejected requests never reach calm:queries"
    async with aiohttp.ClientSession() as http, http.post(f"{base}/v1/completions", data=b"{not json") as r:
        assert r.status == 400
        assert set((await r.json())["error"]) == {"message", "type", "param", "code"}


async def test_unknown_model_is_404(base: str) -> None:
    client = async_client(base)
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"
    await client.close()


async def test_timeout_is_504_and_overload_is_429(stub: StubPipeline, settings: Settings, redis_url: str) -> None:
    async with serving(settings, redis_url, timeout_s=1.0, max_inflight=1) as url:
        client = async_client(url)
        hanging = asyncio.create_task(client.completions.create(model="calm", prompt="hang on"))
        await stub.wait_seen(lambda q: q.get("prompt") == "hang on")
        with pytest.raises(openai.RateLimitError) as busy:
            await client.completions.create(model="calm", prompt="1+1=")
        assert busy.value.status_code == 429 and busy.value.code == "overloaded"
        with pytest.raises(openai.APIStatusError) as late:
            await hanging
        assert late.value.status_code == 504 and late.value.code == "timeout"
        done = await client.completions.create(model="calm", prompt="1+1=")  # the slot is free again
        assert done.choices[0].text == "echo:1+1="
        await client.close()


async def test_no_alive_worker_is_503(aclient: aioredis.Redis, settings: Settings, redis_url: str) -> None:
    async with running_stub(aclient, settings, with_worker=False), serving(settings, redis_url) as url:
        client = async_client(url)
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="calm", messages=[{"role": "user", "content": "1+1="}])
        assert info.value.status_code == 503 and info.value.code == "no_workers"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/readyz") as r:
                assert r.status == 503
                assert "no worker is alive" in (await r.json())["problems"]
            async with http.get(f"{url}/healthz") as r:
                assert r.status == 200
        await client.close()


async def test_api_keys_guard_the_api(stub: StubPipeline, settings: Settings, redis_url: str) -> None:
    async with serving(settings, redis_url, api_keys=("s3cret",)) as url:
        with pytest.raises(openai.AuthenticationError):
            async with async_client(url, api_key="wrong") as wrong:
                await wrong.models.list()
        good = async_client(url, api_key="s3cret")
        assert (await good.models.list()).data[0].id == "calm"
        await good.close()
        async with aiohttp.ClientSession() as http, http.get(f"{url}/readyz") as r:
            assert r.status == 200  # operations endpoints stay open


# -- logs and rendering --------------------------------------------------------------
async def test_request_log_lines_carry_the_query_id(base: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="calm.gateway")
    async with aiohttp.ClientSession() as http:
        body = {"model": "calm", "prompt": "2+2="}
        async with http.post(f"{base}/v1/completions", json=body, headers={"Idempotency-Key": "log-1"}) as r:
            assert r.status == 200
    lines = [r for r in caplog.records if r.name.startswith("calm.gateway") and "/v1/completions" in r.getMessage()]
    assert lines and all(getattr(r, "query_id", None) == "log-1" for r in lines)
    parsed = json.loads(JsonLines("gateway").format(lines[0]))
    assert parsed["query_id"] == "log-1" and parsed["role"] == "gateway"


def test_chat_rendering_keeps_a_lone_user_message_verbatim() -> None:
    assert render_chat([{"role": "user", "content": "sort 9 3 5 ="}]) == "sort 9 3 5 ="
    parts = [{"type": "text", "text": "12"}, {"type": "text", "text": "+7="}]
    assert render_chat([{"role": "user", "content": parts}]) == "12+7="
    transcript = render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                              {"role": "user", "content": "1+1="}])
    assert transcript == "user: hi\nassistant: hello\nuser: 1+1=\nassistant:"
