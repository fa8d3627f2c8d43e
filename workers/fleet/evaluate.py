"""Held-out quality of an exported model: greedy decoding of each eval prompt, scored per domain."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from workers.fleet.data import read_eval_set
from workers.fleet.greedy import GreedyOnnx
from workers.fleet.quality import aggregate, metric_for, score
from workers.fleet.spec import Fleet, FleetError, load_fleet, write_fleet
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


def evaluate_fleet(directory: Path | str, models: Sequence[str] = (), threads: int = 2) -> Fleet:
    """Measure the held-out quality of a fleet's models (all, or those named) on the fleet's eval sets,
    for each domain on their cards that has one, and write it into their cards.

    For a model exported into a fleet (or one built before a metric was recorded): the router's quality
    floor compares models by these figures. Other quality entries on a card are kept.
    """
    fleet = load_fleet(directory)
    unknown = sorted(set(models) - set(fleet.names))
    if unknown:
        raise FleetError(f"{fleet.root}: no model named {', '.join(map(repr, unknown))}")
    cards = []
    for card in fleet.models:
        domains = [d for d in card.domains if d in fleet.eval_sets]
        if (models and card.name not in models) or not domains:
            cards.append(card)
            continue
        sets = {
            d: [replace(item, prompt=card.render(item.prompt)) for item in read_eval_set(fleet.eval_sets[d])]
            for d in domains
        }
        measured = evaluate_model(fleet.model_dir(card), sets, card.eos_token, threads=threads)
        kept = {k: v for k, v in card.quality.items() if k.split(".")[0] not in domains and k not in measured}
        cards.append(replace(card, quality={**kept, **measured}))
    updated = replace(fleet, models=tuple(cards))
    write_fleet(updated)
    return load_fleet(fleet.root)
