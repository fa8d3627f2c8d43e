"""The worker process: hosts engines for some fleet models, serves their work streams, obeys the scheduler."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgspec

from broker.codec import decode, decode_as, encode
from broker.config import WorkerSettings
from broker.consumer import StreamConsumer, ensure_group
from broker.effects import Effects, Entry
from broker.kb import WorkerState
from broker.messages import Control, Result, Telemetry, Work, WorkerEvent
from broker.replies import ReplyBook, generation_reply
from broker.runtime import ProcessRuntime
from workers.energy import EnergyMeter, make_energy_meter
from workers.engine import OnnxCausalLM
from workers.engine_api import Engine
from workers.errors import WorkerError
from workers.fleet.spec import Fleet, FleetError, ModelCard
from workers.isolated import IsolatedEngine, isolated_engine_factory

log = logging.getLogger(__name__)
HEARTBEAT_TTL_FACTOR = 5.0
EngineFactory = Callable[[ModelCard, Fleet], Engine]


@dataclass(frozen=True, slots=True)
class Fault:
    """Faults injected into one model's requests (chaos testing)."""

    delay_ms: float = 0.0
    error_rate: float = 0.0
    confidence_scale: float = 1.0


@dataclass(slots=True)
class Hosted:
    """A loaded model: its engine and the consumer that feeds it."""

    card: ModelCard
    engine: Engine
    consumer: StreamConsumer
    memory_mb: float
    last_used_ms: float = field(default_factory=lambda: time.time() * 1000)


def onnx_engine_factory(ws: WorkerSettings) -> EngineFactory:
    """Engines for optimum-exported causal LMs (and the fleet builder's graphs) as ``ws`` says."""

    def load(card: ModelCard, fleet: Fleet) -> Engine:
        return OnnxCausalLM.load(fleet.model_dir(card), name=card.name, device=ws.device,
                                 intra_op_threads=ws.intra_op_threads, eos_token=card.eos_token,
                                 gpu_index=ws.gpu_index, shared_kv=ws.shared_kv)

    return load


class Worker:
    """Registers itself and its model cards, then loads, serves and evicts models as commanded."""

    def __init__(self, rt: ProcessRuntime, fleet: Fleet, engine_factory: EngineFactory | None = None,
                 worker_type: str = "onnx") -> None:
        self.rt = rt
        self.names = rt.names
        self.settings = rt.settings
        self.ws = rt.settings.worker
        self.replies = ReplyBook(rt.names, rt.settings.ingress.dedup_window_s, rt.settings.streams.replies_maxlen)
        self.fleet = fleet
        self.id = rt.instance
        self.type = worker_type
        self.cards = {c.name: c for c in fleet.models if not self.ws.models or c.name in self.ws.models}
        missing = set(self.ws.models) - set(self.cards)
        if missing:
            raise WorkerError(f"models not in fleet {fleet.root}: {', '.join(sorted(missing))}")
        if engine_factory is not None and self.ws.isolation == "process":
            raise WorkerError("worker.isolation=process builds engines in child processes: name a custom one "
                              "with worker.engine instead of passing an engine factory")
        if self.ws.isolation == "process":
            self.factory = isolated_engine_factory(self.ws, logging.getLevelName(log.getEffectiveLevel()))
        else:
            self.factory = engine_factory or onnx_engine_factory(self.ws)
        self.meter: EnergyMeter = make_energy_meter(self.ws.device, self.ws.watts_per_core, self.ws.gpu_index)
        self.device = self.ws.device
        self.hosted: dict[str, Hosted] = {}
        self._measured: dict[str, float] = {}  # model -> MB its engine took when last loaded here
        self.inflight = 0
        self.faults: dict[str, Fault] = {}
        self._fault_rng = random.Random(0)
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.cards)), thread_name_prefix="infer")
        self._control_lock = asyncio.Lock()

    # -- lifecycle -----------------------------------------------------------------
    async def prime(self) -> None:
        """Load and close the smallest model once, so the runtime's one-time allocations (arenas, thread
        pools) are not charged to the first model a later RSS measurement sees."""
        if not self.cards or self.ws.isolation == "process":  # each child has its own runtime: nothing to share
            return
        smallest = min(self.cards.values(), key=lambda c: (c.memory_mb, c.params))
        try:
            engine = await asyncio.get_running_loop().run_in_executor(self._pool, self.factory, smallest, self.fleet)
        except Exception as e:  # a broken model is reported when it is really loaded
            log.debug("priming with %s failed: %s", smallest.name, e)
            return
        engine.close()

    async def start(self) -> None:
        """Register (clearing what a previous life of this worker id left), subscribe to control, preload."""
        await self.prime()
        ttl = self.ws.heartbeat_s * HEARTBEAT_TTL_FACTOR
        previous = (await self.rt.kb.workers()).get(self.id)
        pipe = self.rt.client.pipeline(transaction=True)
        if previous is not None:
            for model in previous.models_loaded:
                self.rt.kb.set_loaded(pipe, model, self.id, False)
        for card in self.cards.values():
            self.rt.kb.register_model(pipe, card.name, _card_fields(card, self.fleet))
        self.rt.kb.register_worker(pipe, self._state(), ttl)
        await pipe.execute()
        await ensure_group(self.rt.client, self.names.control(self.id), self.names.GROUP_CONTROL, start="$")
        self.rt.consumer(self.names.control(self.id), self.names.GROUP_CONTROL, handler=self.on_control,
                         batch=16, block_ms=500)
        self.rt.every(self.ws.heartbeat_s, self.heartbeat, "heartbeat")
        if self.ws.isolation == "process":
            self.rt.every(self.ws.heartbeat_s, self.reap_dead_engines, "reap dead engines")
        self.rt.on_stop(self.stop)
        for model in self.ws.preload:
            await self.load(model, reason="preload")
        await self._event("registered", detail=f"{self.type}/{self.device}, {len(self.cards)} models")
        log.info("worker %s registered: %s", self.id, ", ".join(self.cards))

    async def stop(self) -> None:
        """Evict everything, tell the scheduler, and mark this worker stopped."""
        for model in list(self.hosted):
            await self.evict(model, reason="worker stopping")
        await self._event("stopping")
        pipe = self.rt.client.pipeline(transaction=True)
        self.rt.kb.remove_worker(pipe, self.id, ())
        await pipe.execute()
        self.meter.close()
        self._pool.shutdown(wait=False)

    def _state(self) -> WorkerState:
        return WorkerState(
            id=self.id, type=self.type, device=self.device, pid=os.getpid(), host=socket.gethostname(),
            memory_budget_mb=float(self.ws.memory_mb), memory_used_mb=self.memory_used_mb,
            models_loaded=tuple(self.hosted), models_servable=tuple(self.cards), heartbeat_ms=time.time() * 1000,
        )

    @property
    def memory_used_mb(self) -> float:
        return sum(h.memory_mb for h in self.hosted.values())

    async def heartbeat(self) -> None:
        await self._read_faults()
        ttl = self.ws.heartbeat_s * HEARTBEAT_TTL_FACTOR
        pipe = self.rt.client.pipeline(transaction=False)
        pipe.sismember(self.names.workers, self.id)
        self.rt.kb.heartbeat(
            pipe, self.id, ttl, models_loaded=list(self.hosted),
            memory_used_mb=f"{self.memory_used_mb:.1f}", inflight=self.inflight, state="up",
            last_used={m: h.last_used_ms for m, h in self.hosted.items()},
        )
        known, *_ = await pipe.execute()
        if not known:  # the scheduler removed us after missed heartbeats (we hung, or were paused): rejoin
            log.warning("worker %s was declared dead; registering again with %s loaded", self.id,
                        ", ".join(self.hosted) or "nothing")
            pipe = self.rt.client.pipeline(transaction=True)
            self.rt.kb.register_worker(pipe, self._state(), ttl)
            for model in self.hosted:
                self.rt.kb.set_loaded(pipe, model, self.id, True)
            await pipe.execute()

    async def _read_faults(self) -> None:
        """Pick up injected faults (``calm:faults:<model>``) for the hosted models."""
        if not self.hosted:
            self.faults = {}
            return
        pipe = self.rt.client.pipeline(transaction=False)
        models = list(self.hosted)
        for model in models:
            pipe.hgetall(self.names.faults(model))
        rows: list[Any] = await pipe.execute()
        faults: dict[str, Fault] = {}
        for model, row in zip(models, rows, strict=True):
            if row:
                values = {k.decode(): float(v) for k, v in row.items()}
                faults[model] = Fault(values.get("delay_ms", 0.0), values.get("error_rate", 0.0),
                                      values.get("confidence_scale", 1.0))
        self.faults = faults

    async def _event(self, event: str, model: str = "", detail: str = "", memory_mb: float = 0.0) -> None:
        message = WorkerEvent(worker=self.id, event=event, model=model, detail=detail, memory_mb=memory_mb,
                              at_ms=time.time() * 1000)
        await self.rt.client.xadd(self.names.sched, encode(message), maxlen=self.settings.streams.maxlen)

    # -- control -------------------------------------------------------------------
    async def on_control(self, entry: Entry) -> Effects:
        command = decode_as(Control, entry.fields, entry.id, entry.stream)
        if command.action == "load":
            await self.load(command.model, reason=command.reason)
        elif command.action == "evict":
            await self.evict(command.model, reason=command.reason)
        else:
            return Effects().dead_letter(self.names, entry, f"unknown control action {command.action!r}", "worker")
        return Effects()

    async def load(self, model: str, reason: str = "") -> bool:
        """Load ``model`` and start serving its work stream; False (and a load_failed event) when impossible."""
        async with self._control_lock:
            if model in self.hosted:
                await self._event("loaded", model, "already loaded", self.hosted[model].memory_mb)
                return True
            card = self.cards.get(model)
            problem = None
            if card is None:
                problem = f"model {model!r} is not servable by worker {self.id}"
            elif self.memory_used_mb + self._expected_mb(card) > self.ws.memory_mb:
                problem = (f"{model} needs ~{self._expected_mb(card):.1f} MB; {self.memory_used_mb:.1f} of "
                           f"{self.ws.memory_mb} MB in use")
            if problem is None and card is not None:
                try:
                    engine = await asyncio.get_running_loop().run_in_executor(
                        self._pool, self.factory, card, self.fleet)
                except Exception as e:
                    problem = f"loading {model} failed: {' '.join(str(e).split())}"  # one line for logs and events
                else:
                    measured = max(engine.memory_bytes / 2**20, 0.1)
                    self._measured[model] = measured
                    if self.memory_used_mb + measured > self.ws.memory_mb:  # the budget holds on measured sizes
                        engine.close()
                        problem = (f"{model} measured {measured:.1f} MB; {self.memory_used_mb:.1f} of "
                                   f"{self.ws.memory_mb} MB in use")
                        await self.rt.client.hset(self.names.model(model), "memory_mb", f"{measured:.1f}")
                if problem is None:
                    await self._host(card, engine)
                    log.info("loaded %s in %.2fs (%.1f MB) [%s]", model, engine.load_s,
                             self.hosted[model].memory_mb, reason)
                    return True
            log.error("%s", problem)
            await self._event("load_failed", model, problem or "")
            return False

    def _expected_mb(self, card: ModelCard) -> float:
        """What loading ``card`` will take: its last measured size here, else the card's estimate."""
        return max(float(card.memory_mb), self._measured.get(card.name, 0.0))

    async def _host(self, card: ModelCard, engine: Engine) -> None:
        memory_mb = max(engine.memory_bytes / 2**20, 0.1)
        stream = self.names.work(card.name)
        await ensure_group(self.rt.client, stream, self.names.GROUP_WORKERS)
        consumer = self.rt.consumer(stream, self.names.GROUP_WORKERS, handler=partial(self.serve, card.name),
                                    batch=1, block_ms=500, trim_acked=True)
        self.hosted[card.name] = Hosted(card, engine, consumer, memory_mb)
        alpha = self.settings.qos.ewma_alpha
        pipe = self.rt.client.pipeline(transaction=True)
        self.rt.kb.set_loaded(pipe, card.name, self.id, True)
        self.rt.kb.set_load_time(pipe, card.name, engine.load_s, alpha)
        pipe.hset(self.names.model(card.name), "memory_mb", f"{memory_mb:.1f}")
        await pipe.execute()
        await self.heartbeat()
        await self._event("loaded", card.name, f"{engine.load_s:.3f}s", memory_mb)

    async def evict(self, model: str, reason: str = "") -> None:
        """Stop serving ``model`` (finishing the request in hand), free its engine, and report the memory."""
        async with self._control_lock:
            await self._evict_held(model, reason)

    async def _evict_held(self, model: str, reason: str) -> None:
        """`evict`'s work; the caller holds the control lock."""
        hosted = self.hosted.pop(model, None)
        if hosted is None:
            await self._event("evicted", model, "was not loaded")
            return
        await self.rt.retire(hosted.consumer)
        await asyncio.get_running_loop().run_in_executor(self._pool, hosted.engine.close)
        # An isolated engine's child was measured just before it was killed: that is what came back.
        freed_mb = hosted.engine.freed_bytes / 2**20 if isinstance(hosted.engine, IsolatedEngine) \
            else hosted.memory_mb
        pipe = self.rt.client.pipeline(transaction=True)
        self.rt.kb.set_loaded(pipe, model, self.id, False)
        await pipe.execute()
        await self.heartbeat()
        await self._event("evicted", model, reason, freed_mb)
        log.info("evicted %s, %.1f MB freed [%s]", model, freed_mb, reason)

    async def reap_dead_engines(self) -> None:
        """Report unloaded every model whose engine process died (a crash, the OOM killer); the worker lives on.

        Reaps run one at a time under the control lock: one that returns has seen every earlier one's
        evictions reported, and a dead engine is reported once.
        """
        async with self._control_lock:
            for model, hosted in list(self.hosted.items()):
                if isinstance(hosted.engine, IsolatedEngine) and hosted.engine.died:
                    log.error("engine process %d of %s died; reporting it unloaded", hosted.engine.pid, model)
                    await self._evict_held(model, reason="engine process died")

    # -- serving -------------------------------------------------------------------
    async def serve(self, model: str, entry: Entry) -> Effects:
        """Run one :class:`Work` item and emit its result and telemetry."""
        message = decode(entry.fields, entry.id, entry.stream)
        if not isinstance(message, Work):
            return Effects().dead_letter(self.names, entry, f"expected work, got {type(message).__name__}", "worker")
        hosted = self.hosted.get(model)
        if hosted is None:
            return Effects(ack=False)  # evicted meanwhile: leave it pending for another worker
        picked_ms = time.time() * 1000
        queue_ms = max(0.0, picked_ms - message.dispatched_ms)
        self.inflight += 1
        try:
            outcome = await asyncio.get_running_loop().run_in_executor(self._pool, self._generate, hosted, message)
        finally:
            self.inflight -= 1
        fault = self.faults.get(model, Fault())
        delay_ms = self.ws.inject_delay_ms + fault.delay_ms
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        if not outcome["ok"] and isinstance(hosted.engine, IsolatedEngine) and hosted.engine.died:
            self.rt.spawn(self.reap_dead_engines(), "reap dead engines")
        if outcome["ok"] and fault.error_rate > 0 and self._fault_rng.random() < fault.error_rate:
            outcome = {"ok": False, "error": "injected fault"}
        if outcome["ok"] and fault.confidence_scale != 1.0:
            gen = outcome["gen"]
            outcome["gen"] = dataclasses.replace(gen, confidence=gen.confidence * fault.confidence_scale)
        hosted.last_used_ms = time.time() * 1000
        return self._outcome_effects(message, queue_ms, outcome, delay_ms)

    def _generate(self, hosted: Hosted, work: Work) -> dict[str, Any]:
        try:
            token = self.meter.start()
            gen = hosted.engine.generate(hosted.card.render(work.prompt), max_new_tokens=work.max_new_tokens,
                                         temperature=work.temperature, seed=work.seed)
            energy = self.meter.stop(token, gen.cpu_s)
        except Exception as e:
            log.exception("generation failed for %s", work.id, extra={"query_id": work.id})
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}
        return {"ok": True, "gen": gen, "energy_j": energy}

    def _outcome_effects(self, work: Work, queue_ms: float, outcome: dict[str, Any], delay_ms: float = 0.0) -> Effects:
        now_ms = time.time() * 1000
        maxlen = self.settings.streams.maxlen
        if not outcome["ok"]:
            result = Result(id=work.id, attempt=work.attempt, model=work.model, worker=self.id, ok=False,
                            error=outcome["error"], queue_ms=queue_ms, energy_source=self.meter.source)
            telemetry = Telemetry(model=work.model, worker=self.id, ok=False, inference_ms=0.0, queue_ms=queue_ms,
                                  tokens_out=0, energy_j=0.0, confidence=0.0, at_ms=now_ms)
        else:
            gen = outcome["gen"]
            inference_ms = gen.inference_ms + delay_ms
            result = Result(
                id=work.id, attempt=work.attempt, model=work.model, worker=self.id, ok=True, text=gen.text,
                tokens_in=gen.tokens_in, tokens_out=gen.tokens_out, queue_ms=queue_ms, inference_ms=inference_ms,
                energy_j=outcome["energy_j"], energy_source=self.meter.source, confidence=gen.confidence,
                finish_reason=gen.finish_reason,
            )
            telemetry = Telemetry(model=work.model, worker=self.id, ok=True, inference_ms=inference_ms,
                                  queue_ms=queue_ms, tokens_out=gen.tokens_out, energy_j=outcome["energy_j"],
                                  confidence=gen.confidence, at_ms=now_ms)
        effects = Effects()
        reply = self._reply(work, result, now_ms) if result.ok else None
        if reply is not None:
            effects.call(lambda p: self.replies.deliver(p, work.id, work.reply_to, reply, work.reply_copy))
        return (effects.xadd(self.names.results, encode(result), maxlen=maxlen)
                .xadd(self.names.telemetry, encode(telemetry), maxlen=maxlen))

    @staticmethod
    def _reply(work: Work, result: Result, now_ms: float) -> dict[str, Any] | None:
        """The query's reply, when the executor asked this worker to deliver it (else None: the executor replies)."""
        if not work.reply_to or not work.reply:
            return None
        try:
            template = msgspec.msgpack.decode(work.reply)
        except msgspec.DecodeError as e:
            log.warning("work %s: unreadable reply fields (%s); the executor replies", work.id, e,
                        extra={"query_id": work.id})
            return None
        if not isinstance(template, dict):
            log.warning("work %s: reply fields are not a map; the executor replies", work.id,
                        extra={"query_id": work.id})
            return None
        return generation_reply(template, result, work.arrived_ms, now_ms)


def max_context(card: ModelCard, fleet: Fleet) -> int:
    """The model's context length from its config.json (0 when unknown)."""
    try:
        config = json.loads((fleet.model_dir(card) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return 0


def card_exemplars(card: ModelCard, fleet: Fleet) -> list[str]:
    """The card's exemplar prompts; an unreadable file is logged and routing falls back to the card."""
    try:
        return list(fleet.exemplars(card))
    except FleetError as e:
        log.warning("model %s: routing without exemplars: %s", card.name, e)
        return []


def _card_fields(card: ModelCard, fleet: Fleet) -> dict[str, Any]:
    return {
        "max_context": max_context(card, fleet), "exemplars": card_exemplars(card, fleet),
        "description": card.description, "examples": list(card.examples), "domains": list(card.domains),
        "prompt_template": card.prompt_template, "params": card.params, "memory_mb": card.memory_mb,
        "source": card.source, "baseline": card.baseline, "quality": dict(card.quality), "eos_token": card.eos_token,
    }


def load_engine_factory(spec: str, settings: WorkerSettings) -> EngineFactory:
    """The engine factory named by ``module:function`` (called with the worker settings)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise WorkerError(f"worker.engine must look like 'package.module:function', got {spec!r}")
    try:
        maker = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise WorkerError(f"cannot load engine factory {spec!r}: {e}") from e
    factory: EngineFactory = maker(settings)
    return factory


async def start(rt: ProcessRuntime, fleet: Fleet, engine_factory: EngineFactory | None = None) -> Worker:
    ws = rt.settings.worker
    if engine_factory is None and ws.engine and ws.isolation == "none":  # isolated: each child builds its own
        engine_factory = load_engine_factory(ws.engine, ws)
    worker = Worker(rt, fleet, engine_factory, worker_type=ws.type)
    await worker.start()
    return worker
