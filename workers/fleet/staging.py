"""Directories published whole: written in a scratch sibling, then renamed into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """A scratch directory beside ``target``; when the block ends without error it replaces ``target``
    (a leftover there is removed first). Readers never see a half-written ``target``; the scratch is
    removed either way. The rename raises OSError when another process put ``target`` back meanwhile."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
