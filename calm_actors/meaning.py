"""The semantic cache's guard: two prompts may share an answer only if nothing that changes meaning differs.

Embeddings put "12+7=" next to "12+8=" and "enable X" next to "disable X"; this guard refuses such
pairs by comparing what embeddings blur: numbers, operators, negations, polar words (antonym
pairs, normalised to one side so "enable" and "disable" differ), quoted strings and code identifiers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = re.compile(r"(?<![A-Za-z_])\d+(?:[.,]\d+)?")
_OPERATOR = re.compile(r"[+\-*/%^<>=!&|]")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_']*")
_QUOTED = re.compile(r"\"([^\"]*)\"|'([^']*)'|`([^`]*)`")

NEGATIONS = frozenset({
    "not", "no", "never", "none", "nothing", "nobody", "neither", "nor", "without", "cannot", "can't", "don't",
    "doesn't", "didn't", "isn't", "aren't", "wasn't", "weren't", "won't", "wouldn't", "shouldn't", "couldn't",
    "mustn't", "hasn't", "haven't", "hadn't", "except", "exclude", "excluding", "unless", "false",
})

# Words whose opposite changes the answer; each pair is (a, b) and both sides are kept distinct.
POLAR_PAIRS = (
    ("enable", "disable"), ("enabled", "disabled"), ("add", "remove"), ("insert", "delete"), ("increase", "decrease"),
    ("increment", "decrement"), ("ascending", "descending"), ("asc", "desc"), ("min", "max"), ("minimum", "maximum"),
    ("smallest", "largest"), ("lowest", "highest"), ("first", "last"), ("before", "after"), ("above", "below"),
    ("more", "less"), ("greater", "smaller"), ("larger", "smaller"), ("open", "close"), ("start", "stop"),
    ("allow", "deny"), ("accept", "reject"), ("true", "false"), ("on", "off"), ("up", "down"), ("left", "right"),
    ("encode", "decode"), ("encrypt", "decrypt"), ("compress", "decompress"), ("import", "export"),
    ("read", "write"), ("get", "set"), ("push", "pop"), ("sum", "difference"), ("plus", "minus"),
    ("multiply", "divide"), ("sort", "reverse"), ("lower", "upper"), ("lowercase", "uppercase"),
    ("include", "exclude"), ("win", "lose"), ("buy", "sell"), ("positive", "negative"), ("odd", "even"),
)
POLAR_WORDS = frozenset(w for pair in POLAR_PAIRS for w in pair)


@dataclass(frozen=True, slots=True)
class Signature:
    """The meaning-bearing parts of a prompt that must match exactly for a cache hit."""

    numbers: tuple[str, ...]
    operators: tuple[str, ...]
    negations: frozenset[str]
    polar: frozenset[str]
    quoted: tuple[str, ...]
    identifiers: frozenset[str]


def signature(prompt: str) -> Signature:
    text = prompt.strip()
    words = [w.lower() for w in _WORD.findall(text)]
    quoted = tuple(next(g for g in m.groups() if g is not None) for m in _QUOTED.finditer(text))
    identifiers = frozenset(w for w in _WORD.findall(text) if "_" in w or any(c.isupper() for c in w[1:]))
    stripped = _NUMBER.sub(" ", text)
    return Signature(
        numbers=tuple(n.replace(",", ".") for n in _NUMBER.findall(text)),
        operators=tuple(_OPERATOR.findall(_WORD.sub(" ", stripped))),
        negations=frozenset(w for w in words if w in NEGATIONS or w.endswith("n't")),
        polar=frozenset(w for w in words if w in POLAR_WORDS),
        quoted=quoted,
        identifiers=identifiers,
    )


def same_meaning_parts(a: str, b: str) -> tuple[bool, str]:
    """Whether two prompts agree on every meaning-bearing part; the reason when they do not."""
    sa, sb = signature(a), signature(b)
    for name in ("numbers", "operators", "negations", "polar", "quoted", "identifiers"):
        if getattr(sa, name) != getattr(sb, name):
            return False, f"{name} differ"
    return True, ""


def normalise(prompt: str) -> str:
    """The exact cache's view of a prompt: whitespace collapsed, case kept (case can matter in code)."""
    return " ".join(prompt.split())
