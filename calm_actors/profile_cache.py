"""Embedded routing profiles kept on disk, so a restarted monitor does not embed the same texts again.

A profile is a pure function of the embedder and the texts (description, examples, exemplars), so
the file is named by a digest of both. Embedding a demo fleet's 5 × 2,050 profile texts takes about a
minute of a busy core; reading them back takes milliseconds. Files are written atomically and the
oldest are removed beyond ``max_files``; an unreadable file is treated as missing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class ProfileDiskCache:
    """``(rows, dim)`` float32 matrices by (embedder identity, texts)."""

    def __init__(self, root: Path, embedder_identity: str, max_files: int = 64) -> None:
        self.root = root
        self.embedder_identity = embedder_identity
        self.max_files = max_files

    def key(self, texts: Sequence[str]) -> str:
        h = hashlib.sha256(self.embedder_identity.encode())
        for text in texts:
            h.update(b"\x00")
            h.update(text.encode("utf-8", "surrogatepass"))
        return h.hexdigest()[:32]

    def _path(self, texts: Sequence[str]) -> Path:
        return self.root / f"{self.key(texts)}.npy"

    def get(self, texts: Sequence[str]) -> np.ndarray | None:
        path = self._path(texts)
        try:
            matrix = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable cached profile %s: %s", path, e)
            return None
        if matrix.ndim != 2 or matrix.shape[0] != len(texts) or matrix.dtype != np.float32:
            log.warning("ignoring cached profile %s of shape %s for %d texts", path, matrix.shape, len(texts))
            return None
        os.utime(path)  # recently used: pruned last
        return matrix

    def put(self, texts: Sequence[str], matrix: np.ndarray) -> None:
        """Store ``matrix``; a full disk or a read-only cache only costs the next restart its time."""
        tmp = ""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, np.ascontiguousarray(matrix, dtype=np.float32), allow_pickle=False)
            os.replace(tmp, self._path(texts))
            self._prune()
        except OSError as e:
            log.warning("cannot cache a routing profile in %s: %s", self.root, e)
            if tmp:
                Path(tmp).unlink(missing_ok=True)  # a half-written file (full disk) is not left behind

    def _prune(self) -> None:
        files = sorted(self.root.glob("*.npy"), key=lambda p: p.stat().st_mtime)
        for old in files[: max(0, len(files) - self.max_files)]:
            old.unlink(missing_ok=True)
