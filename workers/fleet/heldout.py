"""Deterministic train/held-out split by a hash of an item's key (stable across runs and machines)."""

from __future__ import annotations

import hashlib


def bucket(key: str) -> float:
    """A stable pseudo-random number in [0, 1) for `key`."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_heldout(key: str, fraction: float) -> bool:
    """True when `key` belongs to the held-out (eval) split of size about `fraction`."""
    return bucket(key) < fraction
