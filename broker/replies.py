"""Replies and idempotency: one reply per query id, delivered atomically to every waiting stream."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from redis.asyncio.client import Pipeline

from broker.codec import plain_fields
from broker.messages import ReplyCopy, Result
from broker.names import Names
from broker.scripts import LuaScript

# KEYS: claim, done, waiters. ARGV: entry_id, ttl_s, reply_to.
# Returns {"new"} for a first sighting, {"done", payload} when a reply exists, {"wait"} when in progress.
# The claim holds the claiming entry's id: the same entry delivered again (its first consumer died before
# forwarding it) is "new" again, so a crash between claim and forward loses nothing.
_CLAIM = LuaScript("""
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return {'new'} end
local done = redis.call('GET', KEYS[2])
if not done and redis.call('GET', KEYS[1]) == ARGV[1] then return {'new'} end
if done then return {'done', done} end
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[2])
return {'wait'}
""")

# KEYS: done, waiters. ARGV: reply_to, ttl_s, maxlen, payload, then field/value pairs.
# Writes the reply once: a second delivery for the same id is a no-op that returns 0.
_DELIVER = LuaScript("""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[4], 'EX', ARGV[2])
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', ARGV[1], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
local seen = {[ARGV[1]] = true}
for _, stream in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  if not seen[stream] then
    seen[stream] = true
    redis.call('XADD', stream, 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
  end
end
redis.call('DEL', KEYS[2])
return 1
""")


@dataclass(frozen=True, slots=True)
class Claim:
    """What the idempotency check found for a query id."""

    state: str  # "new" | "done" | "wait"
    reply: dict[str, str] | None = None


class ReplyBook:
    """Claims query ids at ingress and delivers each query's single reply."""

    def __init__(self, names: Names, dedup_window_s: int, replies_maxlen: int) -> None:
        self.names = names
        self.window_s = dedup_window_s
        self.maxlen = replies_maxlen

    def claim(self, pipe: Pipeline, query_id: str, entry_id: str, reply_to: str) -> None:
        """Queue an idempotency claim; parse its pipeline result with :meth:`parse_claim`."""
        keys = [self.names.claim(query_id), self.names.done(query_id), f"{self.names.claim(query_id)}:waiters"]
        _CLAIM.queue(pipe, keys, [entry_id, self.window_s, reply_to])

    @staticmethod
    def parse_claim(raw: Any) -> Claim:
        state = raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0])
        if state == "done":
            return Claim("done", msgspec.msgpack.decode(raw[1]))
        return Claim(state)

    def deliver(self, pipe: Pipeline, query_id: str, reply_to: str, reply: Mapping[str, Any],
                copy: ReplyCopy | None = None) -> None:
        """Queue the reply's delivery to ``reply_to`` and every stream that waits for the same id, and ``copy``
        (written on every call: the latest reply's fields)."""
        if copy is not None:
            kept = {name: reply[name] for name in copy.fields if name in reply}
            pipe.set(copy.key, msgspec.msgpack.encode(kept), ex=copy.ttl_s)
        fields = plain_fields(reply)
        payload = msgspec.msgpack.encode(fields)
        keys = [self.names.done(query_id), f"{self.names.claim(query_id)}:waiters"]
        flat: list[str] = []
        for key, value in fields.items():
            flat += [key, value]
        _DELIVER.queue(pipe, keys, [reply_to, self.window_s, self.maxlen, payload, *flat])

    def resend(self, pipe: Pipeline, reply_to: str, reply: Mapping[str, str]) -> None:
        """Queue a copy of an earlier reply onto ``reply_to`` (a duplicate query id arrived)."""
        pipe.xadd(reply_to, dict[Any, Any](reply), maxlen=self.maxlen, approximate=True)

    def send_unclaimed(self, pipe: Pipeline, reply_to: str, reply: Mapping[str, Any]) -> None:
        """Queue a reply that records no idempotency state (rejections of malformed input)."""
        pipe.xadd(reply_to, dict[Any, Any](plain_fields(reply)), maxlen=self.maxlen, approximate=True)


def generation_reply(template: Mapping[str, Any], result: Result, arrived_ms: float, now_ms: float) -> dict[str, Any]:
    """A successful query's reply: ``template`` (the fields the executor fills in at dispatch) with the
    generation's fields from ``result`` and ``latency_ms`` (arrival to now)."""
    return {
        **template, "status": "ok", "text": result.text, "model": result.model, "worker": result.worker,
        "cached": False, "latency_ms": max(0.0, now_ms - arrived_ms), "queue_ms": result.queue_ms,
        "inference_ms": result.inference_ms, "tokens_in": result.tokens_in, "tokens_out": result.tokens_out,
        "energy_j": result.energy_j, "energy_source": result.energy_source, "confidence": result.confidence,
        "error": "", "finish_reason": result.finish_reason,
    }
