"""Monitor: validates and embeds incoming queries, and keeps the knowledge base's live QoS current."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from broker.codec import decode_as, encode, ingress_fields, readable_fields
from broker.effects import Effects, Entry
from broker.errors import DecodeError, ValidationError
from broker.ingress import entry_ms, parse_query, query_id, reply_stream
from broker.kb import ModelState
from broker.messages import Embedded, Query, Telemetry
from broker.replies import ReplyBook
from broker.runtime import ProcessRuntime
from calm_actors.cache import ResponseCache, exact_hit
from calm_actors.domain_classifier import classifier_digest, train
from calm_actors.embedder import SentenceEmbedder, embedder_dir
from calm_actors.embedding_memo import EmbeddingMemo
from calm_actors.profile_cache import ProfileDiskCache
from calm_actors.replying import rejection
from calm_actors.scoring import profile_texts
from calm_actors.tuning import Tuning

log = logging.getLogger(__name__)
PROFILE_REFRESH_S = 1.0
EMBEDDING_CACHE = 10_000  # prompts whose embedding the monitor keeps (repeats skip the embedder)
SEND_YIELDS = 3  # loop turns a pipeline on a pooled connection needs to write its commands (redis-py 8: 2)


class Monitor:
    """Consumes ``calm:queries`` and ``calm:telemetry``."""

    def __init__(self, rt: ProcessRuntime, fleet_dir: Path) -> None:
        self.rt = rt
        self.names = rt.names
        self.settings = rt.settings
        self.embedder = SentenceEmbedder(embedder_dir(fleet_dir), max_tokens=rt.settings.ingress.embed_tokens)
        self.replies = ReplyBook(rt.names, rt.settings.ingress.dedup_window_s,
                                 rt.settings.streams.replies_maxlen)
        # Profiles (thousands of texts, seconds) are embedded in this thread; queries on the event loop
        # (``EmbeddingMemo.vectors``), so they never wait behind a profile. The session runs both at once.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        # Training the classifier takes seconds: its own thread too.
        self._train_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
        self.embeddings = EmbeddingMemo(self.embedder.embed_marked, EMBEDDING_CACHE)
        self._known_models: set[str] = set()
        self._classifier_digest = ""
        self._profile_cache = ProfileDiskCache(Path(rt.settings.paths.cache_dir).expanduser() / "profiles",
                                               self.embedder.identity)
        self.cache = ResponseCache(rt.client, rt.names, rt.settings.cache)
        self.tuning = Tuning(rt, ("cache", "planner"))

    def install(self) -> None:
        s = self.settings
        self.rt.consumer(self.names.queries, self.names.GROUP_MONITOR, batch_handler=self.on_queries,
                         batch=s.ingress.embed_batch, trim_acked=True)
        self.rt.consumer(self.names.telemetry, self.names.GROUP_TELEMETRY, batch_handler=self.on_telemetry, batch=256,
                         trim_acked=True)
        self.rt.every(PROFILE_REFRESH_S, self.refresh_profiles, "profiles")
        self.rt.every(1.0, self.retune, "tuning")

    async def retune(self) -> None:
        """Pick up ``cache.*`` and ``planner.*`` overrides set with ``calm config set`` (the exact cache may be
        switched off; a new ``planner.classifier_ridge`` retrains the classifier at the next profile round)."""
        settings = await self.tuning.poll()
        if settings is not None:
            self.settings = settings
            self.cache.settings = settings.cache

    # -- queries -------------------------------------------------------------------
    async def on_queries(self, entries: list[Entry]) -> Sequence[Effects]:
        effects: list[Effects] = [Effects() for _ in entries]
        valid: list[tuple[int, Query]] = []
        for i, entry in enumerate(entries):
            query = self._validate(entry, effects[i])
            if query is not None:
                valid.append((i, query))
        valid = await self._drop_unknown_models(entries, valid, effects)
        if not valid:
            return effects
        # Idempotency claims and exact-cache lookups for the whole batch go out in one round trip, and the
        # prompts are embedded here, in this thread, while it travels: handing them to a thread and back
        # costs two wake-ups, slow on a machine idle between queries. A duplicate's or an exact hit's prompt
        # was usually seen by this monitor before (the memo answers it); when not, it is embedded for nothing.
        pipe = self.rt.client.pipeline(transaction=False)
        keys = [self.cache.exact_key(query) for _, query in valid]
        for (_, query), key in zip(valid, keys, strict=True):
            self.replies.claim(pipe, query.id, query.entry_id, query.reply_to)
            if key is not None:
                pipe.get(key)
        sending = asyncio.ensure_future(pipe.execute())
        await _let_it_send()
        claimed = time.time() * 1000
        try:
            vectors = self.embeddings.vectors([q.prompt for _, q in valid])
        except BaseException:
            await asyncio.gather(sending, return_exceptions=True)  # collected, so nothing is left running
            raise
        results = iter(await sending)
        embedded = time.time() * 1000
        for (i, query), key, vector in zip(valid, keys, vectors, strict=True):
            claim = ReplyBook.parse_claim(next(results))
            cached = self._exact_entry(next(results)) if key is not None else b""
            if claim.state == "new" and cached:
                # Answered from the exact cache: the later stages pass it along without scoring or dispatch.
                message = Embedded(query=query, embedding=b"", stamps={"monitor_ms": claimed}, exact_hit=cached)
                effects[i].xadd(self.names.analyze, encode(message), maxlen=self.settings.streams.maxlen)
            elif claim.state == "new":
                message = Embedded(query=query, embedding=vector.vector, embedding_truncated=not vector.whole,
                                   stamps={"monitor_ms": claimed, "embedded_ms": embedded})
                effects[i].xadd(self.names.analyze, encode(message), maxlen=self.settings.streams.maxlen)
            elif claim.state == "done" and claim.reply is not None:
                reply = claim.reply
                effects[i].call(partial(self.replies.resend, reply_to=query.reply_to, reply=reply))
            # "wait": the first copy is in flight; its delivery also answers this reply stream.
        return effects

    @staticmethod
    def _exact_entry(raw: Any) -> bytes:
        """An exact-cache entry that decodes (else b"": an unreadable entry is a miss, and the reply overwrites it)."""
        if not isinstance(raw, bytes):
            return b""
        try:
            exact_hit(raw)
        except DecodeError as e:
            log.warning("ignoring an unreadable exact-cache entry: %s", e)
            return b""
        return raw

    def _validate(self, entry: Entry, effects: Effects) -> Query | None:
        values: dict[str, Any] = {}
        try:
            values = ingress_fields(entry.fields, entry.id, entry.stream)
            return parse_query(values, entry.id, self.names, self.settings.ingress)
        except (DecodeError, ValidationError) as e:
            self._reject(entry, values or readable_fields(entry.fields), str(e), effects)
            return None

    def _reject(self, entry: Entry, values: dict[str, Any], reason: str, effects: Effects) -> None:
        log.info("rejected query %s: %s", entry.id, reason, extra={"query_id": entry.id})
        effects.dead_letter(self.names, entry, reason, "monitor", self.settings.streams.dead_maxlen)
        target = reply_stream(values, self.names)
        if target is not None:
            reply = rejection(query_id(values, entry.id), reason, entry_ms(entry.id))
            effects.call(lambda p: self.replies.send_unclaimed(p, target, reply))

    async def _drop_unknown_models(self, entries: list[Entry], valid: list[tuple[int, Query]],
                                   effects: list[Effects]) -> list[tuple[int, Query]]:
        """Reject queries pinned to a model no worker registered."""
        if all(q.model is None or q.model in self._known_models for _, q in valid):
            return valid
        self._known_models = set(await self.rt.kb.model_names())
        kept = []
        for i, query in valid:
            if query.model is not None and query.model not in self._known_models:
                values = ingress_fields(entries[i].fields, entries[i].id, entries[i].stream)
                self._reject(entries[i], values, f"unknown model {query.model!r}", effects[i])
            else:
                kept.append((i, query))
        return kept

    # -- telemetry -----------------------------------------------------------------
    async def on_telemetry(self, entries: list[Entry]) -> Sequence[Effects]:
        out: list[Effects] = []
        alpha, window = self.settings.qos.ewma_alpha, self.settings.qos.window
        for entry in entries:
            effects = Effects()
            try:
                t = decode_as(Telemetry, entry.fields, entry.id, entry.stream)
            except DecodeError as e:
                out.append(effects.dead_letter(self.names, entry, str(e), "monitor", self.settings.streams.dead_maxlen))
                continue
            values = {"error_rate": 0.0 if t.ok else 1.0}
            if t.ok:
                tokens = max(1, t.tokens_out)
                values.update(
                    latency_ms=t.queue_ms + t.inference_ms, queue_ms=t.queue_ms, ms_per_token=t.inference_ms / tokens,
                    tokens_per_s=1000.0 * tokens / max(t.inference_ms, 1e-3), energy_j=t.energy_j,
                    energy_per_token_j=t.energy_j / tokens, confidence=t.confidence,
                )
            record = partial(self.rt.kb.record_qos, name=t.model, alpha=alpha, values=values, ok=t.ok, window=window,
                             now_ms=t.at_ms, stale_tau_s=self.settings.qos.stale_tau_s)
            effects.call(record)
            out.append(effects)
        return out

    # -- model profiles ------------------------------------------------------------
    async def refresh_profiles(self) -> None:
        """Embed the description, examples and exemplars of every new or changed model card."""
        models = await self.rt.kb.models()
        self._known_models = set(models)
        todo = []
        for name, state in models.items():
            digest = profile_digest(state, self.embedder.identity)
            if state.profile_rows <= 0 or state.profile_digest != digest:
                todo.append((name, state, digest))
        if todo:
            await self._profile(todo)
        await self.refresh_classifier(None if todo else models)

    async def _profile(self, todo: list[tuple[str, ModelState, str]]) -> None:
        """Embed (or read back from the disk cache) each profile and publish it as soon as it is ready."""
        loop = asyncio.get_running_loop()
        for name, state, digest in todo:
            started = time.perf_counter()
            exemplars = await self.rt.kb.exemplars(name) if state.exemplars_digest else []
            texts = profile_texts(name, state.description, state.examples, exemplars)
            matrix = await loop.run_in_executor(self._pool, self._profile_cache.get, texts)
            source = "cache"
            if matrix is None:
                matrix = await loop.run_in_executor(self._pool, self.embedder.embed, texts)
                await loop.run_in_executor(self._pool, self._profile_cache.put, texts, matrix)
                source = "embedded"
            pipe = self.rt.client.pipeline(transaction=False)
            self.rt.kb.set_profile(pipe, name, np.ascontiguousarray(matrix, dtype=np.float32).tobytes(),
                                   len(texts), digest)
            await pipe.execute()
            log.info("profiled %s: %d texts (%s exemplars), %s in %.1f s", name, len(texts),
                     state.exemplars_digest or "no", source, time.perf_counter() - started)

    async def refresh_classifier(self, known: dict[str, ModelState] | None = None) -> None:
        """Train and store the domain classifier when the profiled specialists, their profiles or the
        ridge penalty change.

        ``known``: the models as just read (None: read them). A model whose profile does not match its
        card yet is left out until a later round; the analyzer uses the classifier only while it knows
        every specialist it scores.
        """
        states = known if known is not None else await self.rt.kb.models()
        models = {n: s for n, s in states.items()
                  if not s.baseline and s.profile_rows > 0
                  and s.profile_digest == profile_digest(s, self.embedder.identity)}
        if len(models) < 2:
            return
        ridge = self.settings.planner.classifier_ridge
        digest = classifier_digest({n: s.profile_digest for n, s in models.items()}, ridge)
        if digest == self._classifier_digest or digest == await self.rt.kb.classifier_digest():
            self._classifier_digest = digest
            return
        profiles = await self.rt.kb.profiles(list(models))
        examples: dict[str, tuple[list[str], np.ndarray]] = {}
        for name, state in models.items():
            exemplars = await self.rt.kb.exemplars(name) if state.exemplars_digest else []
            texts = profile_texts(name, state.description, state.examples, exemplars)
            raw = profiles.get(name)
            if raw is None or len(texts) != state.profile_rows or len(raw) % (4 * len(texts)):
                return  # written while we read: the next round sees it settled
            examples[name] = (texts, np.frombuffer(raw, dtype=np.float32).reshape(len(texts), -1))
        started = time.perf_counter()
        classifier = await asyncio.get_running_loop().run_in_executor(self._train_pool, train, examples, ridge,
                                                                      digest)
        pipe = self.rt.client.pipeline(transaction=False)
        self.rt.kb.set_classifier(pipe, digest, classifier.models, classifier.to_bytes(), time.time() * 1000)
        await pipe.execute()
        self._classifier_digest = digest
        log.info("trained the domain classifier on %d texts of %s in %.2f s",
                 sum(len(t) for t, _ in examples.values()), ", ".join(classifier.models),
                 time.perf_counter() - started)


def profile_digest(state: ModelState, embedder: str) -> str:
    """What a model's routing profile is made of: description, examples, the exemplars' digest and the
    embedder (``SentenceEmbedder.identity``: a rebuilt embedder re-embeds every profile)."""
    key = repr((state.description, state.examples, state.exemplars_digest, state.name, embedder))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


async def start(rt: ProcessRuntime, fleet_dir: Path) -> Monitor:
    """Create the monitor, profile the models already known, and register its consumers."""
    monitor = Monitor(rt, fleet_dir)
    await monitor.refresh_profiles()
    monitor.install()
    return monitor


async def _let_it_send() -> None:
    """Give a just-started pipeline the loop turns it needs to write its commands before the loop blocks.

    When it needs more (a new connection), its round trip starts after the blocking work: slower, not wrong.
    """
    for _ in range(SEND_YIELDS):
        await asyncio.sleep(0)
