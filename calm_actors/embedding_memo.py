"""Prompt embeddings remembered in a bounded LRU; misses are embedded in the embedder's own thread."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import numpy as np

from calm_actors.meaning import normalise


class EmbeddingMemo:
    """Embeddings of prompts by their normalised text; ``capacity`` of them, least recently used out first."""

    def __init__(self, embed: Callable[[Sequence[str]], np.ndarray], pool: Executor, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._embed = embed
        self._pool = pool
        self.capacity = capacity
        self._vectors: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._vectors)

    def __contains__(self, prompt: str) -> bool:
        return normalise(prompt) in self._vectors

    async def get(self, prompts: Sequence[str]) -> list[bytes]:
        """Each prompt's float32 vector as bytes; the prompts not remembered are embedded in one batch in the
        embedder's thread. Raises what the embedder raised (and then remembers nothing new)."""
        missing = sorted({key for key in map(normalise, prompts) if key not in self._vectors})
        if missing:
            vectors = await asyncio.get_running_loop().run_in_executor(self._pool, self._embed, missing)
            for key, vector in zip(missing, vectors, strict=True):
                self._vectors[key] = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
        out = []
        for key in map(normalise, prompts):
            self._vectors.move_to_end(key)
            out.append(self._vectors[key])
        while len(self._vectors) > self.capacity:
            self._vectors.popitem(last=False)
        return out
