"""Text domains from the interpreter itself: Python code (the stdlib sources) and English prose
(`pydoc_data.topics`). Whole documents are held out; eval items are a few lines of a held-out
document as the prompt and the text that follows as the reference.
"""

from __future__ import annotations

import os
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from workers.fleet.heldout import is_heldout
from workers.fleet.synthetic import EvalItem

Document = tuple[str, str]  # (key, text)

_SKIP_DIRS = frozenset({"encodings", "test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"})
MAX_FILE_BYTES = 200_000


@lru_cache(maxsize=1)
def stdlib_files() -> tuple[tuple[str, Path], ...]:
    """(relative path, absolute path) of the stdlib's .py files, sorted, minus tests/encodings/etc."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for fname in filenames:
            if not fname.endswith(".py"):
                continue
            path = Path(dirpath) / fname
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            found.append((path.relative_to(root).as_posix(), path))
    return tuple(sorted(found))


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def continuation_items(
    docs: list[Document], n: int, seed: int, domain: str, ref_chars: int = 64, max_prompt_chars: int = 400
) -> list[EvalItem]:
    """`n` distinct items: 2-6 consecutive lines of a document as prompt, the next `ref_chars` chars
    as reference (skipping spans that are mostly blank)."""
    rng = random.Random(f"{domain}:eval:{seed}")
    usable = [(k, t) for k, t in docs if len(t) > 4 * ref_chars]
    out: list[EvalItem] = []
    seen: set[str] = set()
    for _ in range(200 * max(n, 1)):
        if len(out) >= n or not usable:
            break
        _, text = usable[rng.randrange(len(usable))]
        lines = text.splitlines(keepends=True)
        if len(lines) < 8:
            continue
        start = rng.randrange(0, len(lines) - 7)
        count = rng.randint(2, 6)
        prompt = "".join(lines[start : start + count])
        reference = "".join(lines[start + count :])[:ref_chars]
        if len(prompt.strip()) < 20 or len(prompt) > max_prompt_chars or prompt in seen:
            continue
        if len(reference) < ref_chars or len(reference.split()) < 3:
            continue
        seen.add(prompt)
        out.append(EvalItem(prompt, reference, domain))
    return out


@dataclass(frozen=True, slots=True)
class Code:
    """Python source from the interpreter's stdlib; held-out files form the eval set."""

    heldout_fraction: float = 0.05
    name: str = "code"

    def _docs(self, heldout: bool) -> list[Document]:
        out = []
        for rel, path in stdlib_files():
            if is_heldout(f"code:{rel}", self.heldout_fraction) != heldout:
                continue
            text = _read(path)
            if text and text.strip():
                out.append((rel, text))
        return out

    def train_documents(self, seed: int) -> Iterator[Document]:
        """Training files in a seeded order (read lazily)."""
        files = [(rel, p) for rel, p in stdlib_files() if not is_heldout(f"code:{rel}", self.heldout_fraction)]
        random.Random(f"{self.name}:train:{seed}").shuffle(files)
        for rel, path in files:
            text = _read(path)
            if text and text.strip():
                yield rel, text

    def heldout_keys(self) -> set[str]:
        """Relative paths of the held-out files."""
        return {rel for rel, _ in stdlib_files() if is_heldout(f"code:{rel}", self.heldout_fraction)}

    def exemplars(self, n: int, seed: int) -> list[str]:
        """`n` continuation prompts from training files: what the router compares queries to."""
        return [item.prompt for item in continuation_items(self._docs(heldout=False), n, seed, self.name)]

    def eval_items(self, n: int, seed: int) -> list[EvalItem]:
        """`n` continuation items from held-out files."""
        return continuation_items(self._docs(heldout=True), n, seed, self.name)


def pydoc_topics() -> dict[str, str]:
    """The stdlib's pydoc help topics (name → English text)."""
    from pydoc_data.topics import topics

    return dict(topics)


@dataclass(frozen=True, slots=True)
class Prose:
    """English reference text from `pydoc_data.topics`; held-out topics form the eval set."""

    heldout_fraction: float = 0.12
    name: str = "prose"

    def _docs(self, heldout: bool) -> list[Document]:
        topics = pydoc_topics()
        return [
            (k, topics[k])
            for k in sorted(topics)
            if is_heldout(f"prose:{k}", self.heldout_fraction) == heldout and topics[k].strip()
        ]

    def train_documents(self, seed: int) -> Iterator[Document]:
        """Training topics in a seeded order."""
        docs = self._docs(heldout=False)
        random.Random(f"{self.name}:train:{seed}").shuffle(docs)
        yield from docs

    def heldout_keys(self) -> set[str]:
        """Names of the held-out topics."""
        return {k for k, _ in self._docs(heldout=True)}

    def exemplars(self, n: int, seed: int) -> list[str]:
        """`n` continuation prompts from training topics: what the router compares queries to."""
        return [item.prompt for item in continuation_items(self._docs(heldout=False), n, seed, self.name)]

    def eval_items(self, n: int, seed: int) -> list[EvalItem]:
        """`n` continuation items from held-out topics."""
        return continuation_items(self._docs(heldout=True), n, seed, self.name)
