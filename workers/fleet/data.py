"""Domain registry and eval-set files.

`PAIR_DOMAINS` train one (prompt, completion) per row with the loss on the completion only;
`TEXT_DOMAINS` train as a plain language model on a document stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from workers.fleet.corpora import Code, Prose
from workers.fleet.synthetic import Arithmetic, EvalItem, Sorting

PAIR_DOMAINS = ("arithmetic", "sorting")
TEXT_DOMAINS = ("code", "prose")
DOMAINS = PAIR_DOMAINS + TEXT_DOMAINS

Domain = Arithmetic | Sorting | Code | Prose


@dataclass(frozen=True, slots=True)
class DataRecipe:
    """Settings of the data generators shared by every model of a fleet."""

    arithmetic_ops: tuple[str, ...] = ("+",)
    eval_items_pairs: int = 300
    eval_items_text: int = 60
    eval_seed: int = 20240601


def get_domain(name: str, data: DataRecipe) -> Domain:
    """The generator for domain `name` configured by `data`."""
    if name == "arithmetic":
        return Arithmetic(ops=data.arithmetic_ops)
    if name == "sorting":
        return Sorting()
    if name == "code":
        return Code()
    if name == "prose":
        return Prose()
    raise ValueError(f"unknown domain {name!r}; known: {', '.join(DOMAINS)}")


def eval_items(name: str, data: DataRecipe) -> list[EvalItem]:
    """The held-out eval items of domain `name`."""
    n = data.eval_items_pairs if name in PAIR_DOMAINS else data.eval_items_text
    return get_domain(name, data).eval_items(n, data.eval_seed)


def tokenizer_texts(
    domains: tuple[str, ...], data: DataRecipe, pairs: int = 4000, text_chars: int = 1_500_000
) -> list[str]:
    """Training-split samples of each domain to train the fleet's shared tokenizer on."""
    texts: list[str] = []
    for name in domains:
        domain = get_domain(name, data)
        if isinstance(domain, Arithmetic | Sorting):
            stream = domain.train_pairs(seed=0)
            texts.extend(p + c for p, c in (next(stream) for _ in range(pairs)))
        else:
            size = 0
            for _, text in domain.train_documents(seed=0):
                texts.append(text)
                size += len(text)
                if size >= text_chars:
                    break
    return texts


def write_eval_set(path: Path, items: list[EvalItem]) -> Path:
    """Write `items` as JSON lines `{"prompt", "reference", "domain"}`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for item in items:
            row = {"prompt": item.prompt, "reference": item.reference, "domain": item.domain}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_eval_set(path: Path) -> list[EvalItem]:
    """Read an eval JSONL file written by `write_eval_set`."""
    items = []
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                items.append(EvalItem(row["prompt"], row["reference"], row["domain"]))
    return items
