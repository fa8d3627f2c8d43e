"""Held-out quality of an exported model: greedy decoding of each eval prompt, scored per domain."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from workers.fleet.greedy import GreedyOnnx
from workers.fleet.quality import aggregate, metric_for, score
from workers.fleet.synthetic import EvalItem

PAIR_MAX_NEW_TOKENS = 16
TEXT_MAX_NEW_TOKENS = 64


def evaluate_items(model: GreedyOnnx, items: Sequence[EvalItem]) -> list[float]:
    """Per-item scores of `model` on `items` (all of one domain or mixed)."""
    scores = []
    for item in items:
        if metric_for(item.domain) == "exact_match":
            text = model.generate(item.prompt, max_new_tokens=PAIR_MAX_NEW_TOKENS)
        else:
            text = model.generate(item.prompt, TEXT_MAX_NEW_TOKENS, stop_chars=len(item.reference))
        scores.append(score(item.domain, text, item.reference))
    return scores


def evaluate_model(
    model_dir: Path, eval_sets: Mapping[str, Sequence[EvalItem]], eos_token: str, threads: int = 2
) -> dict[str, float]:
    """Quality per domain as `{"<domain>.<metric>": value}` with its standard error at
    `<domain>.<metric>_se`, plus the bare metric for one domain."""
    model = GreedyOnnx(model_dir, eos_token=eos_token, threads=threads)
    quality: dict[str, float] = {}
    for domain, items in eval_sets.items():
        for metric, value in aggregate(domain, evaluate_items(model, items)).items():
            quality[f"{domain}.{metric}"] = value
    if len(eval_sets) == 1:
        (domain,) = eval_sets
        quality[metric_for(domain)] = quality[f"{domain}.{metric_for(domain)}"]
    return quality
