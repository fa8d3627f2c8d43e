"""The gateway's HTTP handlers: the OpenAI API, health, metrics and the dashboard."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from broker.config import Settings
from broker.kb import KnowledgeBase
from broker.names import Names
from calm.gateway import openai_api as oa
from calm.gateway.errors import ApiError, bad_request, no_workers, overloaded, timed_out, unauthorized, unknown_model
from calm.gateway.events import EventTail
from calm.gateway.fleet import FleetWatch
from calm.gateway.metrics import CONTENT_TYPE, MetricsEndpoint
from calm.gateway.replies import ReplyRouter
from calm.gateway.snapshot import read_snapshot
from calm.gateway.state import dashboard_state

log = logging.getLogger(__name__)
QUERY_ID = web.RequestKey("query_id", str)
MODEL = web.RequestKey("model", str)


@dataclass(slots=True)
class Gateway:
    """The parts one gateway process is made of, and its request handlers."""

    settings: Settings
    names: Names
    kb: KnowledgeBase
    router: ReplyRouter
    fleet: FleetWatch
    events: EventTail
    metrics: MetricsEndpoint
    started: float = field(default_factory=time.time)
    inflight: int = 0
    dashboard: bytes = b""

    # -- OpenAI API ----------------------------------------------------------------
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, "text")

    async def _complete(self, request: web.Request, kind: str) -> web.StreamResponse:
        self._authorize(request)
        body = await _json_body(request)
        query_id = oa.query_id_from(request.headers.get("Idempotency-Key"), f"gw-{uuid.uuid4().hex}")
        request[QUERY_ID] = query_id
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            request[MODEL] = body["model"]
        req = oa.parse_request(kind, body, query_id, self.names, self.settings.ingress)
        if req.pinned is not None and not await self.fleet.has_model(req.pinned):
            raise unknown_model(req.pinned)
        if not await self.fleet.has_workers():
            raise no_workers()
        replies = await self._ask(query_id, req)
        for reply in replies:
            error = oa.reply_error(reply, req.pinned)
            if error is not None:
                log.warning("reply %s: %s", reply.get("status"), reply.get("error"),
                            extra={"query_id": reply.get("id")})
                raise error
        if kind == "chat":
            if not req.stream:
                return web.json_response(oa.chat_completion(query_id, replies[0], req.stop))
            return await _sse(request, oa.chat_chunks(query_id, replies[0], req.stop, req.include_usage))
        if not req.stream:
            return web.json_response(oa.text_completion(query_id, replies, req.stop))
        return await _sse(request, oa.text_chunks(query_id, replies, req.stop, req.include_usage))

    async def _ask(self, query_id: str, req: oa.QueryRequest) -> list[dict[str, str]]:
        """Send one query per prompt and wait for every reply (504 past the gateway's timeout)."""
        count = len(req.prompts)
        limit = self.settings.gateway.max_inflight
        if self.inflight + count > limit:
            raise overloaded(limit)
        self.inflight += count
        self.metrics.gateway.inflight.set(self.inflight)
        ids = [oa.sub_id(query_id, i, count) for i in range(count)]
        futures = []
        try:
            for qid, prompt in zip(ids, req.prompts, strict=True):
                futures.append(await self.router.submit({**req.fields, "prompt": prompt, "id": qid}))
                log.debug("query sent", extra={"query_id": qid})
            timeout_s = self.settings.gateway.timeout_s
            waits = [self.router.wait(qid, fut, timeout_s) for qid, fut in zip(ids, futures, strict=True)]
            results = await asyncio.gather(*waits, return_exceptions=True)
        except (RedisError, OSError) as e:
            for qid, fut in zip(ids, futures, strict=False):
                self.router.forget(qid, fut)
            raise ApiError(503, f"the broker is unreachable: {e}", "service_unavailable", "broker_unavailable") from e
        finally:
            self.inflight -= count
            self.metrics.gateway.inflight.set(self.inflight)
        replies: list[dict[str, str]] = []
        for qid, result in zip(ids, results, strict=True):
            if isinstance(result, TimeoutError):
                self.metrics.gateway.replies.labels("-", "timeout").inc()
                log.warning("no reply within %.1fs", self.settings.gateway.timeout_s, extra={"query_id": qid})
                raise timed_out(self.settings.gateway.timeout_s, qid)
            if isinstance(result, BaseException):
                raise ApiError(503, str(result), "service_unavailable", "gateway_stopping")
            self.metrics.gateway.observe_reply(result)
            replies.append(result)
        return replies

    def model_label(self, requested: str) -> str:
        """``requested`` as a metric label: kept when it names CALM or a known model, else ``other``."""
        if requested in oa.AUTO_MODELS or requested == "-" or requested in self.fleet.view.models:
            return requested
        return "other"

    def _authorize(self, request: web.Request) -> None:
        keys = self.settings.gateway.api_keys
        if not keys:
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = token.strip().encode("utf-8", "replace")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, k.encode()) for k in keys):
            raise unauthorized()

    async def list_models(self, request: web.Request) -> web.Response:
        self._authorize(request)
        view = self.fleet.view if self.fleet.view.ok else await self.fleet.refresh()
        created = int(self.started)
        data = [oa.model_entry("calm", created, {"description": "CALM chooses the model for each query"})]
        for name, model in sorted(view.models.items()):
            data.append(oa.model_entry(name, created, {"domains": list(model.domains),
                                                       "description": model.description,
                                                       "loaded_on": list(model.loaded_on)}))
        return web.json_response({"object": "list", "data": data})

    async def get_model(self, request: web.Request) -> web.Response:
        self._authorize(request)
        name = request.match_info["model"]
        if name in oa.AUTO_MODELS:
            return web.json_response(oa.model_entry(name, int(self.started)))
        if not await self.fleet.has_model(name):
            raise unknown_model(name)
        return web.json_response(oa.model_entry(name, int(self.started)))

    # -- operations ----------------------------------------------------------------
    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        view = await self.fleet.refresh()
        problems = []
        if not view.ok:
            problems.append("the knowledge base cannot be read")
        if not view.alive_workers:
            problems.append("no worker is alive")
        if not self.router.connected:
            problems.append("the reply stream is not being read yet")
        body = {"status": "ready" if not problems else "not ready", "problems": problems,
                "workers": len(view.alive_workers), "models": len(view.models)}
        return web.json_response(body, status=503 if problems else 200)

    async def metrics_text(self, _request: web.Request) -> web.Response:
        return web.Response(body=await self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def state(self, _request: web.Request) -> web.Response:
        try:
            snapshot = await read_snapshot(self.kb)
        except (RedisError, OSError) as e:
            raise ApiError(503, f"the knowledge base cannot be read: {e}", "service_unavailable") from e
        gateway = {"inflight": self.inflight, "uptime_s": round(time.time() - self.started, 1),
                   "replies_seen": self.router.replies_seen, "prefix": self.names.prefix}
        data = dashboard_state(snapshot, self.events, self.settings.scheduler.worker_timeout_s, gateway)
        return web.json_response(data, dumps=_dumps)

    async def index(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.dashboard, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache"})


def load_dashboard() -> bytes:
    return resources.files("calm.gateway").joinpath("dashboard.html").read_bytes()


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the request body is not valid JSON") from None


async def _sse(request: web.Request, chunks: list[dict[str, Any]]) -> web.StreamResponse:
    """Server-sent events: each chunk as one ``data:`` event, then ``data: [DONE]``."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    for chunk in chunks:
        await response.write(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), default=str)
