"""Prompt embeddings remembered in a bounded LRU; misses are embedded in the caller's thread or the embedder's own."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import NamedTuple

import numpy as np

from calm_actors.meaning import normalise


class PromptVector(NamedTuple):
    """A prompt's embedding (float32 bytes) and whether the embedder took the whole prompt (not only its opening)."""

    vector: bytes
    whole: bool


class EmbeddingMemo:
    """Embeddings of prompts by their normalised text; ``capacity`` of them, least recently used out first.

    ``embed`` maps texts to ``(vectors, whole)``, as ``SentenceEmbedder.embed_marked`` does.
    """

    def __init__(self, embed: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]], pool: Executor,
                 capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._embed = embed
        self._pool = pool
        self.capacity = capacity
        self._vectors: OrderedDict[str, PromptVector] = OrderedDict()

    def __len__(self) -> int:
        return len(self._vectors)

    def __contains__(self, prompt: str) -> bool:
        return normalise(prompt) in self._vectors

    def now(self, prompts: Sequence[str]) -> list[PromptVector]:
        """Each prompt's vector, the prompts not remembered embedded in one batch in the calling thread.

        For a query's path: no hand-off to a thread and back (each a wake-up, slow on an idle machine).
        Raises what the embedder raised (and then nothing new is remembered).
        """
        keys = [normalise(p) for p in prompts]
        known = {key: self._vectors[key] for key in keys if key in self._vectors}
        missing = sorted(set(keys) - set(known))
        return self._remember(keys, known, missing, self._embed(missing) if missing else None)

    def get(self, prompts: Sequence[str]) -> Awaitable[list[PromptVector]]:
        """Each prompt's vector; the prompts not remembered are embedded in one batch in the
        embedder's thread, which starts at this call (await the result later to overlap other work with it).
        The awaitable raises what the embedder raised (and then nothing new is remembered)."""
        keys = [normalise(p) for p in prompts]
        known = {key: self._vectors[key] for key in keys if key in self._vectors}
        missing = sorted(set(keys) - set(known))
        running = asyncio.get_running_loop().run_in_executor(self._pool, self._embed, missing) if missing else None
        return self._collect(keys, known, missing, running)

    async def _collect(self, keys: list[str], known: dict[str, PromptVector], missing: list[str],
                       running: asyncio.Future[tuple[np.ndarray, np.ndarray]] | None) -> list[PromptVector]:
        """The vectors of ``keys`` once ``running`` (the embedding of ``missing``) is done."""
        return self._remember(keys, known, missing, await running if running is not None else None)

    def _remember(self, keys: list[str], known: dict[str, PromptVector], missing: list[str],
                  embedded: tuple[np.ndarray, np.ndarray] | None) -> list[PromptVector]:
        """The vectors of ``keys`` (those ``known`` before, the ``missing`` ones from ``embedded``), every one of
        them made the most recently used."""
        vectors = dict(known)
        if embedded is not None:
            matrix, whole = embedded
            for key, vector, fits in zip(missing, matrix, whole, strict=True):
                vectors[key] = PromptVector(np.ascontiguousarray(vector, dtype=np.float32).tobytes(), bool(fits))
        for key in keys:
            self._vectors[key] = vectors[key]
            self._vectors.move_to_end(key)
        while len(self._vectors) > self.capacity:
            self._vectors.popitem(last=False)
        return [vectors[key] for key in keys]
