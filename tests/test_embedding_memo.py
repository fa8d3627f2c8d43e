"""The monitor's prompt-embedding memo: the real embedder's vectors, each new prompt embedded once, a bounded LRU."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from calm_actors.embedder import SentenceEmbedder, embedder_dir
from calm_actors.embedding_memo import EmbeddingMemo
from calm_actors.meaning import normalise


class CountingEmbedder:
    """The fleet's real embedder, counting the texts it was asked to embed (and the thread that asked);
    it can be told to fail."""

    def __init__(self, embedder: SentenceEmbedder) -> None:
        self.embedder = embedder
        self.calls: list[list[str]] = []
        self.threads: list[int] = []
        self.fail = False

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(list(texts))
        self.threads.append(threading.get_ident())
        if self.fail:
            raise RuntimeError("embedder broke")
        return self.embedder.embed_marked(texts)


@pytest.fixture(scope="module")
def real_embedder(tiny_fleet: Path) -> SentenceEmbedder:
    return SentenceEmbedder(embedder_dir(tiny_fleet))


def test_vectors_are_the_embedders_of_the_normalised_prompts(real_embedder: SentenceEmbedder) -> None:
    counting = CountingEmbedder(real_embedder)
    memo = EmbeddingMemo(counting, capacity=16)
    prompts = ["12+30=", "Sort: 5 3 9", " 12+30= "]
    vectors = memo.vectors(prompts)
    expected = real_embedder.embed(sorted({normalise(p) for p in prompts}))  # the batch the memo ran
    by_prompt = dict(zip(sorted({normalise(p) for p in prompts}), expected, strict=True))
    for prompt, got in zip(prompts, vectors, strict=True):
        np.testing.assert_allclose(np.frombuffer(got.vector, dtype=np.float32), by_prompt[normalise(prompt)],
                                   rtol=1e-5, atol=1e-6)
        assert got.whole
    assert vectors[0] == vectors[2]
    assert counting.calls == [sorted({normalise(p) for p in prompts})]  # one batch, each prompt once
    assert counting.threads == [threading.get_ident()]  # in the caller's thread: no hand-off


def test_remembered_prompts_skip_the_embedder(real_embedder: SentenceEmbedder) -> None:
    counting = CountingEmbedder(real_embedder)
    memo = EmbeddingMemo(counting, capacity=16)
    first = memo.vectors(["40+2=", "7+7="])
    again = memo.vectors([" 7+7= ", "1+1=", "40+2="])  # normalised: the same prompt
    assert again[0] == first[1] and again[2] == first[0]
    assert counting.calls == [sorted(map(normalise, ["40+2=", "7+7="])), [normalise("1+1=")]]
    assert "1+1=" in memo and len(memo) == 3


def test_a_failed_run_raises_to_the_caller_and_remembers_nothing(real_embedder: SentenceEmbedder) -> None:
    counting = CountingEmbedder(real_embedder)
    memo = EmbeddingMemo(counting, capacity=16)
    memo.vectors(["1+1="])
    counting.fail = True
    with pytest.raises(RuntimeError, match="embedder broke"):
        memo.vectors(["9+9=", "1+1="])
    assert "9+9=" not in memo and len(memo) == 1
    counting.fail = False
    assert len(memo.vectors(["9+9="])) == 1  # the next delivery of the query embeds it again
    assert counting.calls[1:] == [["9+9="], ["9+9="]]


def test_the_memo_keeps_the_most_recently_used_prompts_only(real_embedder: SentenceEmbedder) -> None:
    memo = EmbeddingMemo(CountingEmbedder(real_embedder), capacity=3)
    memo.vectors(["1+1=", "2+2=", "3+3="])
    memo.vectors(["1+1="])  # used again: now the most recent
    memo.vectors(["4+4="])
    assert len(memo) == 3
    assert "2+2=" not in memo and "1+1=" in memo and "4+4=" in memo
    with pytest.raises(ValueError, match="capacity"):
        EmbeddingMemo(CountingEmbedder(real_embedder), capacity=0)


def test_a_batch_larger_than_the_capacity_still_returns_every_vector(real_embedder: SentenceEmbedder) -> None:
    memo = EmbeddingMemo(CountingEmbedder(real_embedder), capacity=1)
    vectors = memo.vectors(["1+2=", "3+4="])
    assert len(vectors) == 2 and vectors[0] != vectors[1]
    assert len(memo) == 1 and "3+4=" in memo  # the capacity holds once the batch is remembered


def test_the_memo_says_which_prompts_were_embedded_whole(tiny_fleet: Path) -> None:
    short = SentenceEmbedder(embedder_dir(tiny_fleet), max_tokens=8)
    memo = EmbeddingMemo(short.embed_marked, capacity=8)
    long = "def area(radius):\n    return 3.14159 * radius * radius"
    fits, cut = memo.vectors(["12+7=", long])
    assert fits.whole and not cut.whole
    assert memo.vectors([long])[0] == cut  # remembered with its mark
