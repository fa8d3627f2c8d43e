"""The monitor's prompt-embedding memo: the real embedder's vectors, each new prompt embedded once, a bounded LRU."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from calm_actors.embedder import SentenceEmbedder, embedder_dir
from calm_actors.embedding_memo import EmbeddingMemo
from calm_actors.meaning import normalise


class CountingEmbedder:
    """The fleet's real embedder, counting the texts it was asked to embed; it can be told to fail."""

    def __init__(self, embedder: SentenceEmbedder) -> None:
        self.embedder = embedder
        self.calls: list[list[str]] = []
        self.fail = False

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(list(texts))
        if self.fail:
            raise RuntimeError("embedder broke")
        return self.embedder.embed_marked(texts)


@pytest.fixture(scope="module")
def real_embedder(tiny_fleet: Path) -> SentenceEmbedder:
    return SentenceEmbedder(embedder_dir(tiny_fleet))


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=1) as executor:
        yield executor


async def test_vectors_are_the_embedders_of_the_normalised_prompts(real_embedder: SentenceEmbedder,
                                                                  pool: ThreadPoolExecutor) -> None:
    counting = CountingEmbedder(real_embedder)
    memo = EmbeddingMemo(counting, pool, capacity=16)
    prompts = ["12+30=", "Sort: 5 3 9", "12+30="]
    vectors = await memo.get(prompts)
    expected = real_embedder.embed([normalise(p) for p in prompts])
    for got, want in zip(vectors, expected, strict=True):
        np.testing.assert_allclose(np.frombuffer(got.vector, dtype=np.float32), want, rtol=1e-5, atol=1e-6)
        assert got.whole
    assert counting.calls == [sorted({normalise(p) for p in prompts})]  # one batch, each prompt once


async def test_remembered_prompts_skip_the_embedder(real_embedder: SentenceEmbedder, pool: ThreadPoolExecutor) -> None:
    counting = CountingEmbedder(real_embedder)
    memo = EmbeddingMemo(counting, pool, capacity=16)
    first = await memo.get(["40+2=", "7+7="])
    again = await memo.get([" 7+7= ", "1+1=", "40+2="])  # normalised: the same prompt
    assert again[0] == first[1] and again[2] == first[0]
    assert counting.calls == [sorted(map(normalise, ["40+2=", "7+7="])), [normalise("1+1=")]]
    assert "1+1=" in memo and len(memo) == 3


async def test_a_failed_run_raises_to_the_caller_and_remembers_nothing(real_embedder: SentenceEmbedder,
                                                                       pool: ThreadPoolExecutor) -> None:
    counting = CountingEmbedder(real_embedder)
    memo = EmbeddingMemo(counting, pool, capacity=16)
    counting.fail = True
    with pytest.raises(RuntimeError, match="embedder broke"):
        await memo.get(["9+9="])
    assert len(memo) == 0
    counting.fail = False
    assert len(await memo.get(["9+9="])) == 1  # the next delivery of the query embeds it again
    assert len(counting.calls) == 2


async def test_the_memo_keeps_the_most_recently_used_prompts_only(real_embedder: SentenceEmbedder,
                                                                 pool: ThreadPoolExecutor) -> None:
    memo = EmbeddingMemo(CountingEmbedder(real_embedder), pool, capacity=3)
    await memo.get(["1+1=", "2+2=", "3+3="])
    await memo.get(["1+1="])  # used again: now the most recent
    await memo.get(["4+4="])
    assert len(memo) == 3
    assert "2+2=" not in memo and "1+1=" in memo and "4+4=" in memo
    with pytest.raises(ValueError, match="capacity"):
        EmbeddingMemo(CountingEmbedder(real_embedder), pool, capacity=0)


async def test_embedding_starts_at_the_call_so_the_caller_can_overlap_work(real_embedder: SentenceEmbedder,
                                                                          pool: ThreadPoolExecutor) -> None:
    started = threading.Event()

    class Signalling(CountingEmbedder):
        def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
            started.set()
            return super().__call__(texts)

    memo = EmbeddingMemo(Signalling(real_embedder), pool, capacity=8)
    pending = memo.get(["5+6="])
    assert await asyncio.to_thread(started.wait, 30)  # running in the pool before anyone awaits the result
    assert len(await pending) == 1 and "5+6=" in memo


async def test_gets_in_flight_together_each_return_their_own_vectors(real_embedder: SentenceEmbedder,
                                                                     pool: ThreadPoolExecutor) -> None:
    memo = EmbeddingMemo(CountingEmbedder(real_embedder), pool, capacity=1)
    first = memo.get(["1+2=", "3+4="])
    second = memo.get(["3+4="])
    a, b = await first, await second
    assert len(a) == 2 and len(b) == 1
    # The same prompt, embedded in two batches (int8 activations are scaled per batch: near, not equal).
    assert float(np.frombuffer(a[1].vector, dtype=np.float32) @ np.frombuffer(b[0].vector, dtype=np.float32)) > 0.99
    assert len(memo) == 1  # the capacity holds once both are collected


async def test_the_memo_says_which_prompts_were_embedded_whole(tiny_fleet: Path, pool: ThreadPoolExecutor) -> None:
    short = SentenceEmbedder(embedder_dir(tiny_fleet), max_tokens=8)
    memo = EmbeddingMemo(short.embed_marked, pool, capacity=8)
    long = "def area(radius):\n    return 3.14159 * radius * radius"
    fits, cut = await memo.get(["12+7=", long])
    assert fits.whole and not cut.whole
    assert (await memo.get([long]))[0] == cut  # remembered with its mark


async def test_now_embeds_in_the_calling_thread_and_shares_the_memo_with_get(real_embedder: SentenceEmbedder,
                                                                            pool: ThreadPoolExecutor) -> None:
    threads: list[int] = []

    class Recording(CountingEmbedder):
        def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
            threads.append(threading.get_ident())
            return super().__call__(texts)

    counting = Recording(real_embedder)
    memo = EmbeddingMemo(counting, pool, capacity=8)
    vectors = memo.now(["12+30=", " 12+30= ", "Sort: 5 3 9"])
    assert threads == [threading.get_ident()]  # no hand-off to the pool
    expected = real_embedder.embed(["12+30=", "12+30=", "Sort: 5 3 9"])
    for got, want in zip(vectors, expected, strict=True):
        np.testing.assert_allclose(np.frombuffer(got.vector, dtype=np.float32), want, rtol=1e-4, atol=1e-5)
    assert (await memo.get(["12+30="]))[0] == vectors[0]  # remembered: get does not embed it again
    assert counting.calls == [sorted({"12+30=", "Sort: 5 3 9"})]
    counting.fail = True
    with pytest.raises(RuntimeError, match="embedder broke"):
        memo.now(["7+7="])
    assert "7+7=" not in memo and len(memo) == 2
