"""The aiohttp application: routes, error middleware, and the lifecycle of the gateway's parts."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from prometheus_client import disable_created_metrics

from broker.config import Settings
from broker.connection import client as make_client
from broker.kb import KnowledgeBase
from broker.names import Names
from calm.gateway.errors import ApiError, from_http
from calm.gateway.events import EventTail
from calm.gateway.fleet import FleetWatch
from calm.gateway.handlers import MODEL, QUERY_ID, Gateway, load_dashboard
from calm.gateway.metrics import MetricsEndpoint
from calm.gateway.replies import ReplyRouter

log = logging.getLogger(__name__)
GATEWAY = web.AppKey("gateway", Gateway)
API_PREFIX = "/v1/"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(settings: Settings, url: str, tag: str | None = None) -> web.Application:
    """The gateway for the CALM system whose broker is at ``url`` (``tag`` names its reply stream)."""
    app = web.Application(middlewares=[_errors], client_max_size=4 * 2**20)
    gateway = _assemble(settings, url, tag)
    app[GATEWAY] = gateway
    app.cleanup_ctx.append(_lifecycle(gateway))
    app.router.add_post("/v1/chat/completions", _route("chat_completions"), name="chat")
    app.router.add_post("/v1/completions", _route("completions"), name="completions")
    app.router.add_get("/v1/models", _route("list_models"), name="models")
    app.router.add_get("/v1/models/{model}", _route("get_model"), name="model")
    app.router.add_get("/healthz", _route("healthz"))
    app.router.add_get("/readyz", _route("readyz"))
    app.router.add_get("/metrics", _route("metrics_text"))
    app.router.add_get("/api/state", _route("state"))
    app.router.add_get("/", _route("index"))
    return app


def _assemble(settings: Settings, url: str, tag: str | None) -> Gateway:
    """The gateway's parts, each Redis reader on its own connection (no I/O happens here)."""
    names = Names(settings.redis.prefix)
    writer = make_client(url, settings.redis)
    kb = KnowledgeBase(writer, names)
    router = ReplyRouter(writer, make_client(url, settings.redis, blocking=True), names, tag)
    events = EventTail(make_client(url, settings.redis, blocking=True), names)
    return Gateway(settings, names, kb, router, FleetWatch(kb, settings.scheduler.worker_timeout_s), events,
                   MetricsEndpoint(kb, events.counts, settings.scheduler.worker_timeout_s),
                   dashboard=load_dashboard())


def _route(method: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        handler: Handler = getattr(request.app[GATEWAY], method)
        return await handler(request)

    handle.__name__ = method
    return handle


def _lifecycle(gateway: Gateway) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        started: list[Callable[[], Awaitable[None]]] = []
        try:
            for part in (gateway.router, gateway.fleet, gateway.events):
                await part.start()
                started.append(part.close)
            log.info("gateway ready: replies on %s", gateway.router.stream)
            yield
        finally:
            for close in reversed(started):
                await close()
            for conn in (gateway.events.reader, gateway.router.reader, gateway.kb.client):
                await conn.aclose()

    return lifecycle


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """OpenAI error bodies for API failures, request metrics, and one log line per API request."""
    start = time.perf_counter()
    api = request.path.startswith(API_PREFIX)
    try:
        response = await handler(request)
    except ApiError as e:
        response = e.response()
    except web.HTTPException as e:
        if not api or e.status < 400:
            raise
        response = from_http(e).response()
    except Exception:
        log.exception("%s %s failed", request.method, request.path, extra={"query_id": request.get(QUERY_ID)})
        response = ApiError(500, "internal gateway error", "server_error").response()
    if api:
        _record(request, response.status, time.perf_counter() - start)
    return response


def _record(request: web.Request, status: int, seconds: float) -> None:
    gateway = request.app.get(GATEWAY)
    route = request.match_info.route.name or "unknown"
    if gateway is not None:
        model = gateway.model_label(request.get(MODEL, "-"))
        gateway.metrics.gateway.requests.labels(route, model, str(status)).inc()
        gateway.metrics.gateway.http.labels(route).observe(seconds)
    query_id = request.get(QUERY_ID)
    log.log(logging.INFO if query_id else logging.DEBUG, "%s %s %d %.1f ms", request.method, request.path, status,
            seconds * 1000, extra={"query_id": query_id} if query_id else None)


async def serve(settings: Settings, url: str, on_ready: Callable[[str], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; ``on_ready`` gets the listening URL (useful with port 0)."""
    disable_created_metrics()  # this process's scrape output: no *_created series next to every counter
    runner = web.AppRunner(build_app(settings, url), access_log=None, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, settings.gateway.host, settings.gateway.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        listening = f"http://{host}:{port}"
        log.info("gateway listening on %s", listening)
        if on_ready is not None:
            on_ready(listening)
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0
