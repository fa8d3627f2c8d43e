"""What the KB learns from served queries: per model, the centroid of queries it answered confidently."""

from __future__ import annotations

from typing import Any

import numpy as np
import redis.asyncio as aioredis

from broker.names import Names

MAX_WEIGHT = 1000  # the stored centroid counts as at most this many samples, so it keeps adapting


class Learner:
    """Accumulates query embeddings per model in memory and merges them into ``calm:model:<name>``."""

    def __init__(self, client: aioredis.Redis, names: Names) -> None:
        self.client = client
        self.names = names
        self._sums: dict[str, np.ndarray] = {}
        self._counts: dict[str, int] = {}

    def add(self, model: str, embedding: bytes) -> None:
        vector = np.frombuffer(embedding, dtype=np.float32)
        if model in self._sums and self._sums[model].shape != vector.shape:
            return
        self._sums[model] = self._sums.get(model, np.zeros_like(vector)) + vector
        self._counts[model] = self._counts.get(model, 0) + 1

    async def flush(self) -> None:
        """Merge what was gathered since the last flush into the KB (last writer wins across executors)."""
        if not self._sums:
            return
        sums, counts = self._sums, self._counts
        self._sums, self._counts = {}, {}
        pipe = self.client.pipeline(transaction=False)
        for model in sums:
            pipe.hmget(self.names.model(model), ["learned", "learned_n"])
        rows: list[Any] = await pipe.execute()
        pipe = self.client.pipeline(transaction=False)
        for (model, total), (raw, raw_n) in zip(sums.items(), rows, strict=True):
            n_new = counts[model]
            n_old = min(int(raw_n or 0), MAX_WEIGHT)
            merged = total.copy()
            if raw and n_old:
                old = np.frombuffer(raw, dtype=np.float32)
                if old.shape == total.shape:
                    merged = merged + old * n_old
            n = n_old + n_new if raw else n_new
            pipe.hset(self.names.model(model), mapping={"learned": (merged / max(n, 1)).astype(np.float32).tobytes(),
                                                        "learned_n": min(n, MAX_WEIGHT)})
        await pipe.execute()
