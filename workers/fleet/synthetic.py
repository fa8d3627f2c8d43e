"""Synthetic question/answer domains: arithmetic (`37+48=` → `85`) and sorting (`sort 9 3 5 =` → `3 5 9`).

Each domain yields training pairs (prompt, completion) from a seeded RNG, skipping every problem in
the held-out split, and eval items drawn only from the held-out split.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from workers.fleet.heldout import is_heldout

Pair = tuple[str, str]


@dataclass(frozen=True, slots=True)
class EvalItem:
    """One held-out eval prompt with its reference answer."""

    prompt: str
    reference: str
    domain: str


@dataclass(frozen=True, slots=True)
class Arithmetic:
    """`a+b=` (and `a-b=` with a ≥ b when "-" is in `ops`) over operands 0..`max_operand`."""

    ops: tuple[str, ...] = ("+",)
    max_operand: int = 99
    heldout_fraction: float = 0.06
    name: str = "arithmetic"

    def key(self, op: str, a: int, b: int) -> str:
        """Split key; addition uses the unordered pair so `a+b` and `b+a` fall on the same side."""
        if op == "+":
            a, b = min(a, b), max(a, b)
        return f"arith:{a}{op}{b}"

    def _problem(self, op: str, a: int, b: int) -> Pair:
        if op == "-" and a < b:
            a, b = b, a
        value = a + b if op == "+" else a - b
        return f"{a}{op}{b}=", str(value)

    def train_pairs(self, seed: int) -> Iterator[Pair]:
        """An endless seeded stream of training (prompt, completion) pairs, none held out."""
        rng = random.Random(f"{self.name}:train:{seed}")
        while True:
            op = rng.choice(self.ops)
            a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
            if op == "-" and a < b:
                a, b = b, a
            if is_heldout(self.key(op, a, b), self.heldout_fraction):
                continue
            yield self._problem(op, a, b)

    def exemplars(self, n: int, seed: int) -> list[str]:
        """`n` distinct training-split prompts: what the router compares queries to."""
        return _distinct_prompts(self.train_pairs(seed), n)

    def eval_items(self, n: int, seed: int) -> list[EvalItem]:
        """`n` distinct held-out problems (fewer if the held-out split is smaller)."""
        pool = []
        for op in self.ops:
            for a in range(self.max_operand + 1):
                for b in range(self.max_operand + 1):
                    if op == "-" and a < b:
                        continue
                    if is_heldout(self.key(op, a, b), self.heldout_fraction):
                        pool.append(self._problem(op, a, b))
        rng = random.Random(f"{self.name}:eval:{seed}")
        chosen = rng.sample(pool, min(n, len(pool)))
        return [EvalItem(p, c, self.name) for p, c in chosen]

    def is_heldout_prompt(self, prompt: str) -> bool:
        """True when `prompt` (as produced here) is in the held-out split."""
        for op in self.ops:
            left, sep, rest = prompt.partition(op)
            if sep and rest.endswith("="):
                return is_heldout(self.key(op, int(left), int(rest[:-1])), self.heldout_fraction)
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")


@dataclass(frozen=True, slots=True)
class Sorting:
    """`sort 9 3 5 =` → ` 3 5 9` for lists of `min_len`..`max_len` single digits."""

    min_len: int = 3
    max_len: int = 6
    heldout_fraction: float = 0.02
    name: str = "sorting"

    def key(self, items: list[int]) -> str:
        """Split key: the list in its given order."""
        return "sort:" + " ".join(map(str, items))

    @staticmethod
    def _problem(items: list[int]) -> Pair:
        prompt = "sort " + " ".join(map(str, items)) + " ="
        return prompt, " " + " ".join(map(str, sorted(items)))

    def _draw(self, rng: random.Random) -> list[int]:
        length = rng.randint(self.min_len, self.max_len)
        return [rng.randint(0, 9) for _ in range(length)]

    def train_pairs(self, seed: int) -> Iterator[Pair]:
        """An endless seeded stream of training (prompt, completion) pairs, none held out."""
        rng = random.Random(f"{self.name}:train:{seed}")
        while True:
            items = self._draw(rng)
            if not is_heldout(self.key(items), self.heldout_fraction):
                yield self._problem(items)

    def exemplars(self, n: int, seed: int) -> list[str]:
        """`n` distinct training-split prompts: what the router compares queries to."""
        return _distinct_prompts(self.train_pairs(seed), n)

    def eval_items(self, n: int, seed: int) -> list[EvalItem]:
        """`n` distinct held-out lists; references carry no leading space."""
        rng = random.Random(f"{self.name}:eval:{seed}")
        seen: set[str] = set()
        out: list[EvalItem] = []
        for _ in range(10_000 * max(n, 1)):
            if len(out) >= n:
                break
            items = self._draw(rng)
            key = self.key(items)
            if key in seen or not is_heldout(key, self.heldout_fraction):
                continue
            seen.add(key)
            prompt, completion = self._problem(items)
            out.append(EvalItem(prompt, completion.strip(), self.name))
        return out

    def is_heldout_prompt(self, prompt: str) -> bool:
        """True when `prompt` (as produced here) is in the held-out split."""
        body = prompt.removeprefix("sort ").removesuffix(" =")
        return is_heldout(self.key([int(x) for x in body.split()]), self.heldout_fraction)


def _distinct_prompts(pairs: Iterator[Pair], n: int, tries: int = 100) -> list[str]:
    out: dict[str, None] = {}
    for _ in range(tries * max(n, 1)):
        if len(out) >= n:
            break
        out.setdefault(next(pairs)[0])
    return list(out)
