"""What a handler wants written, applied with the entry's XACK in one transactional pipeline."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.client import Pipeline

from broker.names import Names

DEAD_PAYLOAD_LIMIT = 64 * 1024
PipelineOp = Callable[[Pipeline], Any]


@dataclass(slots=True)
class Entry:
    """One stream entry as read from a consumer group."""

    stream: str
    id: str
    fields: dict[bytes, bytes]


@dataclass(slots=True)
class Effects:
    """Writes to make together with the ack. ``ack=False`` leaves the entry pending (to be retried)."""

    ops: list[PipelineOp] = field(default_factory=list)
    ack: bool = True

    def xadd(self, stream: str, fields: Mapping[Any, Any], maxlen: int | None = None) -> Effects:
        self.ops.append(lambda p: p.xadd(stream, dict(fields), maxlen=maxlen, approximate=True))
        return self

    def hset(self, key: str, mapping: Mapping[Any, Any]) -> Effects:
        self.ops.append(lambda p: p.hset(key, mapping=dict(mapping)))
        return self

    def call(self, op: PipelineOp) -> Effects:
        self.ops.append(op)
        return self

    def extend(self, other: Effects) -> Effects:
        self.ops.extend(other.ops)
        return self

    def dead_letter(
        self, names: Names, entry: Entry, reason: str, actor: str, maxlen: int | None = None
    ) -> Effects:
        """Record ``entry`` on the dead-letter stream with ``reason``."""
        return self.xadd(names.dead, dead_letter_fields(entry, reason, actor), maxlen=maxlen)


def dead_letter_fields(entry: Entry, reason: str, actor: str) -> dict[str, str]:
    """The contract's dead-letter fields for one entry."""
    readable = {
        k.decode("utf-8", "backslashreplace"): v.decode("utf-8", "backslashreplace")
        if k != b"m" and k != b"msgpack"
        else v.hex()[:DEAD_PAYLOAD_LIMIT]
        for k, v in entry.fields.items()
    }
    payload = json.dumps(readable, ensure_ascii=False)
    if len(payload.encode("utf-8")) > DEAD_PAYLOAD_LIMIT:
        payload = payload.encode("utf-8")[:DEAD_PAYLOAD_LIMIT].decode("utf-8", "ignore")
    return {
        "stream": entry.stream,
        "entry_id": entry.id,
        "reason": reason[:1000],
        "actor": actor,
        "payload": payload,
        "at": f"{time.time():.3f}",
    }
