"""Routing profiles cached on disk by (embedder, texts): hits, misses, corrupt files, pruning."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from calm_actors.profile_cache import ProfileDiskCache


def test_a_profile_comes_back_only_for_the_same_embedder_and_texts(tmp_path: Path) -> None:
    cache = ProfileDiskCache(tmp_path, "embedder-a")
    texts = ["adds numbers", "12+7=", "3+4="]
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert cache.get(texts) is None
    cache.put(texts, matrix)
    np.testing.assert_array_equal(cache.get(texts), matrix)
    assert cache.get(texts[:2]) is None  # other texts
    assert cache.get(["adds numbers", "12+7=3+4="]) is None  # text boundaries count
    assert ProfileDiskCache(tmp_path, "embedder-b").get(texts) is None  # another embedder


def test_unreadable_or_mismatched_files_are_misses(tmp_path: Path) -> None:
    cache = ProfileDiskCache(tmp_path, "e")
    texts = ["a", "b"]
    (tmp_path / f"{cache.key(texts)}.npy").write_bytes(b"not an npy file")
    assert cache.get(texts) is None
    np.save(tmp_path / f"{cache.key(texts)}.npy", np.zeros((3, 4), np.float32))  # wrong row count
    assert cache.get(texts) is None
    cache.put(texts, np.ones((2, 4), np.float32))
    assert cache.get(texts) is not None


def test_oldest_files_are_pruned(tmp_path: Path) -> None:
    cache = ProfileDiskCache(tmp_path, "e", max_files=3)
    for i in range(3):
        cache.put([f"t{i}"], np.full((1, 2), i, np.float32))
        os.utime(tmp_path / f"{cache.key([f't{i}'])}.npy", (1000 + i, 1000 + i))
    cache.get(["t0"])  # used again: now the newest
    cache.put(["t3"], np.zeros((1, 2), np.float32))
    kept = {p.stem for p in tmp_path.glob("*.npy")}
    assert kept == {cache.key([t]) for t in ("t0", "t2", "t3")}
    assert not list(tmp_path.glob("*.tmp"))


def test_an_unwritable_cache_is_not_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = ProfileDiskCache(blocker / "profiles", "e")  # a directory below a file cannot exist
    cache.put(["a"], np.zeros((1, 2), np.float32))
    assert cache.get(["a"]) is None
