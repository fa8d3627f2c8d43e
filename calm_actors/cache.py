"""Response cache: exact (normalised prompt + every generation parameter + pin) and semantic (same domain,
cosine over recent prompts, refused when :mod:`calm_actors.meaning` finds a meaning-changing difference).

Entries live in Redis with TTLs and caps, so every executor shares them; each executor mirrors the
semantic entries of a domain into memory incrementally (a stream per domain read from its last id).
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from broker.config import CacheSettings
from broker.errors import DecodeError
from broker.messages import Query, ReplyCopy
from broker.names import Names
from calm_actors.meaning import normalise, same_meaning_parts
from calm_actors.similarity import column_major

MIRROR_REFRESH_S = 0.5
CACHED_FIELDS = ("text", "model", "tokens_in", "tokens_out", "confidence", "energy_source", "finish_reason", "domain")


@dataclass(slots=True)
class _Mirror:
    """One domain's semantic entries, as read so far."""

    last_id: str = "0-0"
    vectors: list[np.ndarray] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)
    columns: np.ndarray | None = None  # ``vectors`` by column (``column_major``), made at a search after a change
    nonces: set[str] = field(default_factory=set)  # of ``entries``: this process's stores come back from reads


@dataclass(frozen=True, slots=True)
class Hit:
    kind: str  # "exact" | "semantic"
    reply: dict[str, Any]
    similarity: float = 1.0


def eligible(query: Query, settings: CacheSettings) -> bool:
    return not (settings.greedy_only and query.temperature > 0)


def params_key(query: Query) -> str:
    return f"{query.max_new_tokens}|{query.temperature:g}|{query.model or 'auto'}"


def exact_digest(query: Query) -> str:
    return hashlib.sha256(f"{normalise(query.prompt)}\x00{params_key(query)}".encode()).hexdigest()


def exact_hit(raw: bytes) -> Hit:
    """The hit an exact entry (as stored by :meth:`ResponseCache.store`) stands for; DecodeError if unreadable."""
    try:
        return Hit("exact", msgspec.msgpack.decode(raw, type=dict[str, Any]))
    except msgspec.DecodeError as e:
        raise DecodeError(f"unreadable exact-cache entry: {e}") from e


class ResponseCache:
    """Lookups and stores of finished replies."""

    def __init__(self, client: aioredis.Redis, names: Names, settings: CacheSettings) -> None:
        self.client = client
        self.names = names
        self.settings = settings
        self._mirrors: dict[str, _Mirror] = {}

    def exact_key(self, query: Query) -> str | None:
        """The key of ``query``'s exact entry, or None when the exact cache does not apply to it."""
        if not self.settings.exact or not eligible(query, self.settings):
            return None
        return self.names.cache_exact(exact_digest(query))

    async def lookup(self, query: Query, embedding: bytes, domain: str) -> Hit | None:
        """An earlier reply that answers ``query`` as the shared cache holds it now: the exact entry, else a
        semantic one after reading the domain's new entries (round trips; the executor uses ``recall``)."""
        if not eligible(query, self.settings):
            return None
        key = self.exact_key(query)
        if key is not None:
            raw = await self.client.get(key)
            if isinstance(raw, bytes):
                with contextlib.suppress(DecodeError):  # unreadable: a miss; the new reply overwrites it
                    return exact_hit(raw)
        if not self.settings.semantic or not embedding:
            return None
        self._mirrors.setdefault(domain, _Mirror())
        await self.refresh()
        return self.recall(query, embedding, domain)

    def recall(self, query: Query, embedding: bytes, domain: str) -> Hit | None:
        """A semantic hit from this process's mirror of ``domain``, without I/O.

        The mirror holds this process's own stores at once and other processes' after the next ``refresh``
        (run every ``MIRROR_REFRESH_S``). Exact hits are the monitor's: it looks them up at claim time.
        """
        if not self.settings.semantic or not embedding or not eligible(query, self.settings):
            return None
        self._mirrors.setdefault(domain, _Mirror())  # refreshed from now on
        return self._semantic(query, np.frombuffer(embedding, dtype=np.float32), domain)

    async def refresh(self) -> None:
        """Read the semantic entries stored since the last read into every mirror, in one round trip."""
        if not self.settings.semantic or not self._mirrors:
            return
        domains = sorted(self._mirrors)
        pipe = self.client.pipeline(transaction=False)
        for domain in domains:
            pipe.xrange(self.names.cache_semantic(domain), min=f"({self._mirrors[domain].last_id}", count=10_000)
        results: list[Any] = await pipe.execute()
        for domain, rows in zip(domains, results, strict=True):
            self._extend(self._mirrors[domain], rows)

    def _semantic(self, query: Query, vector: np.ndarray, domain: str) -> Hit | None:
        mirror = self._mirrors.get(domain)
        if mirror is None or not mirror.entries:
            return None
        if mirror.columns is None:
            mirror.columns = column_major(np.stack(mirror.vectors))
        sims = vector @ mirror.columns
        threshold = self.settings.threshold(domain)
        now = time.time()
        key = params_key(query)
        for index in np.argsort(-sims):
            similarity = float(sims[index])
            if similarity < threshold:
                break
            entry = mirror.entries[index]
            if entry["params"] != key or now - entry["at"] > self.settings.semantic_ttl_s:
                continue
            if same_meaning_parts(query.prompt, entry["prompt"])[0]:
                return Hit("semantic", entry["reply"], similarity)
        return None

    def _extend(self, mirror: _Mirror, rows: Any) -> None:
        """Append a domain's newly read stream entries to its mirror (skipping those this process added
        itself when it stored them)."""
        for entry_id, fields in rows:
            mirror.last_id = entry_id.decode()
            self._add(mirror, msgspec.msgpack.decode(fields[b"e"]))

    def _add(self, mirror: _Mirror, entry: dict[str, Any]) -> None:
        """One entry into a mirror, keeping the newest ``max_entries_per_domain``."""
        nonce = entry.get("nonce")
        if nonce is not None:
            if nonce in mirror.nonces:
                return
            mirror.nonces.add(nonce)
        mirror.vectors.append(np.frombuffer(entry.pop("embedding"), dtype=np.float32))
        mirror.entries.append(entry)
        mirror.columns = None
        cap = self.settings.max_entries_per_domain
        if len(mirror.entries) > cap:
            for dropped in mirror.entries[:-cap]:
                mirror.nonces.discard(dropped.get("nonce", ""))
            del mirror.vectors[:-cap]
            del mirror.entries[:-cap]

    def exact_copy(self, query: Query) -> ReplyCopy | None:
        """The exact entry ``store`` writes, as a copy a reply's delivery can write (None: not cached exactly)."""
        key = self.exact_key(query)
        return ReplyCopy(key=key, ttl_s=self.settings.exact_ttl_s, fields=list(CACHED_FIELDS)) if key else None

    def store(self, pipe: Pipeline, query: Query, embedding: bytes, domain: str, reply: dict[str, Any]) -> None:
        """Queue writes that make ``reply`` (an ok reply) reusable."""
        if not eligible(query, self.settings):
            return
        cached = {k: reply[k] for k in CACHED_FIELDS if k in reply}
        now = time.time()
        if self.settings.exact:
            digest = exact_digest(query)
            pipe.set(self.names.cache_exact(digest), msgspec.msgpack.encode(cached), ex=self.settings.exact_ttl_s)
            pipe.zadd(self.names.cache_exact_index, {digest: now})
            # Keep the newest max_exact_entries; the TTL removes the values of trimmed ones soon enough.
            pipe.zremrangebyrank(self.names.cache_exact_index, 0, -self.settings.max_exact_entries - 1)
        if self.settings.semantic and embedding:
            entry = {"prompt": query.prompt, "params": params_key(query), "at": now, "reply": cached,
                     "embedding": embedding, "nonce": secrets.token_hex(8)}
            stream = self.names.cache_semantic(domain)
            pipe.xadd(stream, {"e": msgspec.msgpack.encode(entry)}, maxlen=self.settings.max_entries_per_domain,
                      approximate=True)
            pipe.expire(stream, self.settings.semantic_ttl_s)
            if domain in self._mirrors:  # this process's later lookups see it without reading it back
                self._add(self._mirrors[domain], entry)
