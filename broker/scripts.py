"""Lua scripts queued on pipelines and transactions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio.client import Pipeline


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A Lua script sent with EVAL, body and all.

    redis-py's registered scripts cost a SCRIPT EXISTS round trip on every pipeline that carries one
    (before it is sent) so that EVALSHA cannot fail inside a transaction. EVAL cannot fail that way: the
    server compiles a body once and keeps it by its digest, so each call costs the body's bytes (under
    a kilobyte here) instead of a round trip — on the claim and reply paths of every query.
    """

    text: str

    def queue(self, pipe: Pipeline, keys: Sequence[str], args: Sequence[Any]) -> None:
        """Queue one run of the script on ``pipe``; its result comes back with the pipeline's."""
        pipe.eval(self.text, len(keys), *keys, *args)
