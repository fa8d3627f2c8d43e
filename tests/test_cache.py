"""The response cache against a real Redis and the fleet's real embedder."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from broker.config import CacheSettings
from broker.errors import DecodeError
from broker.messages import Query
from broker.names import Names
from calm_actors.cache import ResponseCache, exact_digest, exact_hit
from calm_actors.embedder import SentenceEmbedder, embedder_dir
from calm_actors.meaning import same_meaning_parts
from tests.probes import CONTRASTS, PARAPHRASES


@pytest.fixture(scope="module")
def embedder(tiny_fleet: Path) -> SentenceEmbedder:
    return SentenceEmbedder(embedder_dir(tiny_fleet))


def _query(prompt: str, **kw: object) -> Query:
    return Query(id="q", entry_id="1-0", prompt=prompt, reply_to="calm:replies", **kw)  # type: ignore[arg-type]


REPLY = {"text": "19", "model": "arith", "tokens_in": 5, "tokens_out": 2, "confidence": 0.9,
         "energy_source": "estimate", "domain": "arithmetic"}


async def _store(cache: ResponseCache, client: aioredis.Redis, embedder: SentenceEmbedder, prompt: str,
                 domain: str = "arithmetic", **kw: object) -> None:
    pipe = client.pipeline(transaction=True)
    cache.store(pipe, _query(prompt, **kw), embedder.embed([prompt])[0].tobytes(), domain, REPLY)
    await pipe.execute()


async def test_exact_hits_need_every_generation_parameter(aclient: aioredis.Redis, names: Names,
                                                         embedder: SentenceEmbedder) -> None:
    cache = ResponseCache(aclient, names, CacheSettings(semantic=False))
    await _store(cache, aclient, embedder, "12+7=", max_new_tokens=8)
    hit = await cache.lookup(_query("12+7=", max_new_tokens=8), b"", "arithmetic")
    assert hit is not None and hit.kind == "exact" and hit.reply["text"] == "19"
    assert await cache.lookup(_query(" 12+7=  ", max_new_tokens=8), b"", "arithmetic") is not None  # normalised
    assert await cache.lookup(_query("12+7=", max_new_tokens=9), b"", "arithmetic") is None
    assert await cache.lookup(_query("12+7=", max_new_tokens=8, model="arith"), b"", "arithmetic") is None
    assert await cache.lookup(_query("12+7=", max_new_tokens=8, temperature=0.7), b"", "arithmetic") is None
    assert await aclient.ttl(names.cache_exact(exact_digest(_query("12+7=", max_new_tokens=8)))) > 0


async def test_unreadable_exact_entries_are_misses(aclient: aioredis.Redis, names: Names) -> None:
    cache = ResponseCache(aclient, names, CacheSettings(semantic=False))
    key = cache.exact_key(_query("1+1="))
    assert key == names.cache_exact(exact_digest(_query("1+1=")))
    for junk in (b"\xc1", msgspec.msgpack.encode([1, 2])):  # not msgpack; msgpack but not a reply
        await aclient.set(key, junk)
        assert await cache.lookup(_query("1+1="), b"", "arithmetic") is None
        with pytest.raises(DecodeError, match="unreadable exact-cache entry"):
            exact_hit(junk)
    assert exact_hit(msgspec.msgpack.encode(REPLY)).reply == REPLY
    # No key where the exact cache does not apply: switched off, or a sampled query.
    assert ResponseCache(aclient, names, CacheSettings(exact=False)).exact_key(_query("1+1=")) is None
    assert cache.exact_key(_query("1+1=", temperature=0.7)) is None


async def test_sampled_replies_are_not_cached(aclient: aioredis.Redis, names: Names,
                                              embedder: SentenceEmbedder) -> None:
    cache = ResponseCache(aclient, names, CacheSettings())
    await _store(cache, aclient, embedder, "tell me a story", domain="prose", temperature=0.8)
    assert await aclient.exists(names.cache_semantic("prose")) == 0
    assert await cache.lookup(_query("tell me a story", temperature=0.8), b"", "prose") is None


async def test_semantic_probe_set_has_no_false_hits(aclient: aioredis.Redis, names: Names,
                                                    embedder: SentenceEmbedder) -> None:
    """Contrasts never hit; paraphrases that the guard lets through hit when similar enough."""
    settings = CacheSettings(exact=False, semantic_threshold=0.85, domain_thresholds="")
    false_hits, hits = [], 0
    for i, (a, b) in enumerate(CONTRASTS):
        cache = ResponseCache(aclient, Names(f"{names.prefix}c{i}:"), settings)
        await _store(cache, aclient, embedder, a, domain="d")
        vector = embedder.embed([b])[0].tobytes()
        if await cache.lookup(_query(b), vector, "d") is not None:
            false_hits.append((a, b))
    for i, (a, b) in enumerate(PARAPHRASES):
        cache = ResponseCache(aclient, Names(f"{names.prefix}p{i}:"), settings)
        await _store(cache, aclient, embedder, a, domain="d")
        hit = await cache.lookup(_query(b), embedder.embed([b])[0].tobytes(), "d")
        hits += hit is not None and hit.kind == "semantic"
    assert false_hits == []
    assert hits >= len(PARAPHRASES) // 2, f"only {hits}/{len(PARAPHRASES)} paraphrases hit"
    for i in range(len(CONTRASTS)):
        await aclient.delete(f"{names.prefix}c{i}:cache:semantic:d")
    for i in range(len(PARAPHRASES)):
        await aclient.delete(f"{names.prefix}p{i}:cache:semantic:d")


def test_the_guard_refuses_every_contrast_and_passes_plain_paraphrases() -> None:
    for a, b in CONTRASTS:
        assert not same_meaning_parts(a, b)[0], (a, b)
    assert same_meaning_parts("12+7=", "12 + 7 =")[0]
    assert same_meaning_parts("How do I open a file in Python?", "how do i open a file in python")[0]


async def test_semantic_hits_stay_within_the_domain(aclient: aioredis.Redis, names: Names,
                                                    embedder: SentenceEmbedder) -> None:
    cache = ResponseCache(aclient, names, CacheSettings(exact=False, domain_thresholds=""))
    await _store(cache, aclient, embedder, "12+7=", domain="arithmetic")
    vector = embedder.embed(["12 + 7 ="])[0].tobytes()
    assert await cache.lookup(_query("12 + 7 ="), vector, "sorting") is None
    assert (await cache.lookup(_query("12 + 7 ="), vector, "arithmetic")) is not None


async def test_recall_sees_own_stores_at_once_and_other_executors_after_a_refresh(
        aclient: aioredis.Redis, names: Names, embedder: SentenceEmbedder) -> None:
    """The executor's lookup has no round trip: its own stores are in its mirror at once; another
    executor's arrive with the periodic refresh, once each."""
    settings = CacheSettings(exact=False, domain_thresholds="")
    mine, other = ResponseCache(aclient, names, settings), ResponseCache(aclient, names, settings)
    vector = embedder.embed(["12 + 7 ="])[0].tobytes()
    for cache in (mine, other):
        assert cache.recall(_query("12 + 7 ="), vector, "arithmetic") is None  # empty mirrors, now followed
    await _store(mine, aclient, embedder, "12+7=", domain="arithmetic")
    hit = mine.recall(_query("12 + 7 ="), vector, "arithmetic")
    assert hit is not None and hit.kind == "semantic" and hit.reply["text"] == "19"
    assert other.recall(_query("12 + 7 ="), vector, "arithmetic") is None  # not read yet
    await other.refresh()
    assert other.recall(_query("12 + 7 ="), vector, "arithmetic") is not None
    await mine.refresh()  # reads its own entry back: recognised, not mirrored twice
    await other.refresh()  # nothing new
    assert len(mine._mirrors["arithmetic"].entries) == len(other._mirrors["arithmetic"].entries) == 1
    assert mine.recall(_query("12 + 7 ="), vector, "sorting") is None  # still within the domain
    assert mine.recall(_query("12 + 7 =", temperature=0.7), vector, "arithmetic") is None  # sampled: never


async def test_a_mirror_keeps_the_newest_entries_up_to_its_cap(aclient: aioredis.Redis, names: Names,
                                                               embedder: SentenceEmbedder) -> None:
    cache = ResponseCache(aclient, names, CacheSettings(exact=False, domain_thresholds="", max_entries_per_domain=2))
    cache.recall(_query("1+1="), embedder.embed(["1+1="])[0].tobytes(), "arithmetic")
    for prompt in ("1+1=", "2+2=", "3+3="):
        await _store(cache, aclient, embedder, prompt, domain="arithmetic")
    mirror = cache._mirrors["arithmetic"]
    assert [e["prompt"] for e in mirror.entries] == ["2+2=", "3+3="] and len(mirror.nonces) == 2
    await cache.refresh()  # the stream still holds all three (trimming is approximate): the newest two stay
    assert [e["prompt"] for e in mirror.entries] == ["2+2=", "3+3="]
