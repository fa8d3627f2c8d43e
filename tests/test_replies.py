"""ReplyBook idempotency on a real server: one reply per query id, to every stream that asked."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from broker.codec import plain_fields
from broker.names import Names
from broker.replies import Claim, ReplyBook

REPLY: dict[str, Any] = {
    "id": "q1", "status": "ok", "text": "4", "model": "tiny-math", "worker": "w1", "cached": False,
    "latency_ms": 12.5, "tokens_out": 1, "energy_j": 0.25, "error": None,
}


def _book(client: aioredis.Redis, names: Names) -> ReplyBook:
    return ReplyBook(names, dedup_window_s=60, replies_maxlen=1000)


async def _claim(client: aioredis.Redis, book: ReplyBook, query_id: str, entry_id: str, reply_to: str) -> Claim:
    pipe = client.pipeline(transaction=True)
    book.claim(pipe, query_id, entry_id, reply_to)
    (raw,) = await pipe.execute()
    return book.parse_claim(raw)


async def _deliver(client: aioredis.Redis, book: ReplyBook, query_id: str, reply_to: str,
                   reply: dict[str, Any]) -> int:
    pipe = client.pipeline(transaction=True)
    book.deliver(pipe, query_id, reply_to, reply)
    (written,) = await pipe.execute()
    return int(written)


async def _entries(client: aioredis.Redis, stream: str) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in await client.xrange(stream)]


async def test_claim_wait_deliver_done(aclient: aioredis.Redis, names: Names) -> None:
    book = _book(aclient, names)
    main = names.replies
    waiter = f"{names.replies}:second-client"

    first = await _claim(aclient, book, "q1", "1-0", main)
    assert first == Claim("new")
    assert 0 < await aclient.ttl(names.claim("q1")) <= 60

    second = await _claim(aclient, book, "q1", "2-0", waiter)
    assert second == Claim("wait")
    assert await aclient.lrange(f"{names.claim('q1')}:waiters", 0, -1) == [waiter.encode()]

    assert await _deliver(aclient, book, "q1", main, REPLY) == 1
    expected = plain_fields(REPLY)
    assert await _entries(aclient, main) == [expected]
    assert await _entries(aclient, waiter) == [expected]
    assert expected["cached"] == "0" and expected["error"] == ""
    assert await aclient.exists(f"{names.claim('q1')}:waiters") == 0
    assert 0 < await aclient.ttl(names.done("q1")) <= 60

    later = await _claim(aclient, book, "q1", "3-0", f"{names.replies}:third")
    assert later.state == "done"
    assert later.reply == expected
    assert await aclient.exists(f"{names.replies}:third") == 0  # the caller resends; the claim writes nothing

    assert await _deliver(aclient, book, "q1", main, {**REPLY, "text": "five"}) == 0
    assert await aclient.xlen(main) == 1
    assert await aclient.xlen(waiter) == 1
    again = await _claim(aclient, book, "q1", "4-0", main)
    assert again.reply == expected  # the first reply stands


async def test_waiter_on_the_same_stream_gets_one_entry(aclient: aioredis.Redis, names: Names) -> None:
    book = _book(aclient, names)
    assert (await _claim(aclient, book, "q2", "1-0", names.replies)).state == "new"
    assert (await _claim(aclient, book, "q2", "2-0", names.replies)).state == "wait"
    assert (await _claim(aclient, book, "q2", "3-0", names.replies)).state == "wait"
    assert await _deliver(aclient, book, "q2", names.replies, {**REPLY, "id": "q2"}) == 1
    assert await aclient.xlen(names.replies) == 1


async def test_several_distinct_waiters_each_get_one_entry(aclient: aioredis.Redis, names: Names) -> None:
    book = _book(aclient, names)
    streams = [f"{names.replies}:{i}" for i in range(3)]
    assert (await _claim(aclient, book, "q3", "1-0", names.replies)).state == "new"
    for i, stream in enumerate(streams):
        assert (await _claim(aclient, book, "q3", f"{i + 2}-0", stream)).state == "wait"
    await _claim(aclient, book, "q3", "9-0", streams[0])  # the same waiter twice
    assert await _deliver(aclient, book, "q3", names.replies, {**REPLY, "id": "q3"}) == 1
    for stream in [names.replies, *streams]:
        assert await aclient.xlen(stream) == 1


async def test_ids_are_independent(aclient: aioredis.Redis, names: Names) -> None:
    book = _book(aclient, names)
    assert (await _claim(aclient, book, "a", "1-0", names.replies)).state == "new"
    assert (await _claim(aclient, book, "b", "2-0", names.replies)).state == "new"
    assert await _deliver(aclient, book, "a", names.replies, {**REPLY, "id": "a"}) == 1
    assert (await _claim(aclient, book, "b", "3-0", names.replies)).state == "wait"
    assert await _deliver(aclient, book, "b", names.replies, {**REPLY, "id": "b"}) == 1
    assert [e["id"] for e in await _entries(aclient, names.replies)] == ["a", "b"]


async def test_resend_and_unclaimed_replies(aclient: aioredis.Redis, names: Names) -> None:
    book = _book(aclient, names)
    pipe = aclient.pipeline(transaction=True)
    book.resend(pipe, names.replies, {"id": "x", "status": "ok"})
    book.send_unclaimed(pipe, names.replies, {"id": "y", "status": "rejected", "cached": True, "error": "bad"})
    await pipe.execute()
    assert await _entries(aclient, names.replies) == [
        {"id": "x", "status": "ok"},
        {"id": "y", "status": "rejected", "cached": "1", "error": "bad"},
    ]
    assert await aclient.exists(names.done("y"), names.claim("y")) == 0  # no idempotency state


async def test_a_redelivered_claiming_entry_is_new_again(aclient, names) -> None:  # type: ignore[no-untyped-def]
    """The monitor may die between the claim and forwarding: the same entry, redelivered, is processed."""
    from broker.replies import ReplyBook

    book = ReplyBook(names, dedup_window_s=60, replies_maxlen=100)
    results = []
    for entry_id in ("5-0", "5-0", "6-0"):
        pipe = aclient.pipeline(transaction=False)
        book.claim(pipe, "q-redelivered", entry_id, names.replies)
        results.append(ReplyBook.parse_claim((await pipe.execute())[0]).state)
    assert results == ["new", "new", "wait"]
