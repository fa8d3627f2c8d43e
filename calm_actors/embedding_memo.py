"""Prompt embeddings remembered in a bounded LRU; misses are embedded in the caller's thread."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
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

    def __init__(self, embed: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]], capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._embed = embed
        self.capacity = capacity
        self._vectors: OrderedDict[str, PromptVector] = OrderedDict()

    def __len__(self) -> int:
        return len(self._vectors)

    def __contains__(self, prompt: str) -> bool:
        return normalise(prompt) in self._vectors

    def vectors(self, prompts: Sequence[str]) -> list[PromptVector]:
        """Each prompt's vector, the prompts not remembered embedded in one batch in the calling thread,
        every one of them made the most recently used.

        A query's path calls this on its event loop: no hand-off to a thread and back, each a wake-up
        that is slow on a machine idle between queries. Raises what the embedder raised (and then
        nothing new is remembered).
        """
        keys = [normalise(p) for p in prompts]
        vectors = {key: self._vectors[key] for key in keys if key in self._vectors}
        missing = sorted(set(keys) - set(vectors))
        if missing:
            matrix, whole = self._embed(missing)
            for key, vector, fits in zip(missing, matrix, whole, strict=True):
                vectors[key] = PromptVector(np.ascontiguousarray(vector, dtype=np.float32).tobytes(), bool(fits))
        for key in keys:
            self._vectors[key] = vectors[key]
            self._vectors.move_to_end(key)
        while len(self._vectors) > self.capacity:
            self._vectors.popitem(last=False)
        return [vectors[key] for key in keys]
