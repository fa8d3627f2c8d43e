"""``calm bench routing``: how often semantic routing sends a held-out prompt to its domain's specialist.

Offline and deterministic: the fleet's own embedder, profiles and domain classifier built from the cards
exactly as the monitor builds them, and the analyzer's fit (``blended_fits``). Three variants side by
side: exemplars + classifier (the default), exemplars with cosine fit only, and the cards alone
(description and examples), so what each layer adds is visible.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from broker.config import IngressSettings, PlannerSettings
from calm_actors.domain_classifier import DomainClassifier, train
from calm_actors.embedder import SentenceEmbedder, embedder_dir
from calm_actors.scoring import blended_fits, profile_texts
from calm_actors.similarity import StackedProfiles
from workers.fleet.data import get_domain, read_eval_set
from workers.fleet.profiles import PROFILES
from workers.fleet.recipes import recipe_hash
from workers.fleet.spec import Fleet, load_fleet

BATCH = 64
DEFAULT_EMBED_TOKENS = IngressSettings().embed_tokens


@dataclass(slots=True)
class DomainResult:
    """Routing of one domain's held-out prompts."""

    queries: int = 0
    correct: int = 0
    routed: Counter[str] = field(default_factory=Counter)
    misrouted: list[dict[str, str]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.queries if self.queries else 0.0

    def to_json(self, keep_misrouted: int) -> dict[str, Any]:
        return {"queries": self.queries, "correct": self.correct, "accuracy": round(self.accuracy, 4),
                "routed": dict(self.routed.most_common()), "misrouted": self.misrouted[:keep_misrouted]}


def specialists(fleet: Fleet) -> dict[str, str]:
    """Non-baseline model → the domain it serves (its first domain, else its name)."""
    return {c.name: (c.domains[0] if c.domains else c.name) for c in fleet.models if not c.baseline}


@dataclass(frozen=True, slots=True)
class Variant:
    """One way of routing: which profile texts are used, and whether the domain classifier sharpens fit."""

    exemplars: bool
    classifier: bool


VARIANTS = {
    "classifier": Variant(exemplars=True, classifier=True),  # what the analyzer does by default
    "exemplars": Variant(exemplars=True, classifier=False),
    "card_only": Variant(exemplars=False, classifier=False),
}


@dataclass(frozen=True, slots=True)
class Router:
    """Each specialist's routing profile (built as the monitor builds it) and, maybe, the classifier."""

    profiles: StackedProfiles
    classifier: DomainClassifier | None

    def route(self, embeddings: np.ndarray, prompts: Sequence[str], settings: PlannerSettings) -> list[str]:
        """The best-fitting model for each embedded prompt, by the analyzer's blended fit."""
        names = list(self.profiles.names)
        out = []
        for embedding, prompt in zip(embeddings, prompts, strict=True):
            every = self.profiles.fits(embedding, {})
            cosines = [every[n] for n in names]
            fits = blended_fits(names, [False] * len(names), cosines, embedding, prompt, self.classifier, settings)
            out.append(names[int(np.argmax(fits))])
        return out


def build_router(fleet: Fleet, embedder: SentenceEmbedder, variant: Variant, settings: PlannerSettings) -> Router:
    """Profiles (and the classifier) from the fleet's cards, exactly as the monitor builds them."""
    texts: dict[str, list[str]] = {}
    for card in fleet.models:
        if card.baseline:
            continue
        exemplars = fleet.exemplars(card) if variant.exemplars else ()
        texts[card.name] = profile_texts(card.name, card.description, card.examples, exemplars)
    profiles = {name: embedder.embed(t) for name, t in texts.items()}
    classifier = None
    if variant.classifier and len(profiles) >= 2:
        examples = {name: (texts[name], profiles[name]) for name in profiles}
        classifier = train(examples, settings.classifier_ridge, digest="bench")
    return Router(StackedProfiles(profiles, settings.profile_rank), classifier)


class DrawError(ValueError):
    """Fresh held-out prompts cannot be drawn for this fleet."""


def eval_prompts(fleet: Fleet, limit: int | None = None) -> dict[str, list[str]]:
    """The fleet's own held-out eval prompts of every domain that has a specialist (at most ``limit`` each)."""
    served = set(specialists(fleet).values())
    return {domain: [item.prompt for item in read_eval_set(path)][:limit]
            for domain, path in sorted(fleet.eval_sets.items()) if domain in served}


def drawn_prompts(fleet: Fleet, per_domain: int, seed: int) -> dict[str, list[str]]:
    """``per_domain`` fresh prompts per specialist domain from the held-out split of the fleet's recipe.

    The same held-out documents (or generators) as the fleet's eval sets, another draw: a larger
    sample than the eval sets, and one no routing setting was tuned on when ``seed`` is new. Prompts
    already in the fleet's eval sets are left out, so a small held-out split (the arithmetic sums)
    gives fewer. Needs a fleet built from a known profile.
    """
    if per_domain <= 0:
        raise DrawError(f"--draw must be a positive number of prompts per domain, got {per_domain}")
    recipe = PROFILES.get(fleet.profile)
    if recipe is None or recipe_hash(recipe) != fleet.recipe_hash:
        raise DrawError(f"{fleet.root}: not built from a known profile's recipe (profile {fleet.profile!r}); "
                        "--draw needs a fleet from `calm fleet build`")
    own = eval_prompts(fleet)
    out: dict[str, list[str]] = {}
    for domain in sorted(set(specialists(fleet).values()) & set(recipe.domains)):
        seen = set(own.get(domain, ()))
        items = get_domain(domain, recipe.data).eval_items(per_domain + len(seen), seed)
        out[domain] = [item.prompt for item in items if item.prompt not in seen][:per_domain]
    return out


def evaluate(fleet: Fleet, embedder: SentenceEmbedder, variant: Variant, settings: PlannerSettings,
             prompts_by_domain: dict[str, list[str]]) -> dict[str, DomainResult]:
    """Route every prompt of every domain; count where each went (right: that domain's specialist)."""
    domain_of = specialists(fleet)
    router = build_router(fleet, embedder, variant, settings)
    results: dict[str, DomainResult] = {}
    for domain, prompts in prompts_by_domain.items():
        result = results.setdefault(domain, DomainResult())
        for start in range(0, len(prompts), BATCH):
            batch = prompts[start:start + BATCH]
            for prompt, model in zip(batch, router.route(embedder.embed(batch), batch, settings), strict=True):
                result.queries += 1
                result.routed[model] += 1
                if domain_of[model] == domain:
                    result.correct += 1
                else:
                    result.misrouted.append({"prompt": prompt[:120], "routed_to": model})
    return results


def summary(results: dict[str, DomainResult], keep_misrouted: int = 5) -> dict[str, Any]:
    queries = sum(r.queries for r in results.values())
    correct = sum(r.correct for r in results.values())
    return {"queries": queries, "correct": correct, "accuracy": round(correct / queries, 4) if queries else 0.0,
            "min_domain_accuracy": round(min((r.accuracy for r in results.values()), default=0.0), 4),
            "domains": {d: r.to_json(keep_misrouted) for d, r in results.items()}}


def run(fleet_dir: Path, settings: PlannerSettings | None = None, limit: int | None = None,
        draw: int | None = None, draw_seed: int = 1, embed_tokens: int = DEFAULT_EMBED_TOKENS) -> dict[str, Any]:
    """Every variant on one fleet: ``{"routing": {VARIANT: SUMMARY, …}, "prompts": …, "fleet": …}``.

    The prompts are the fleet's eval sets, or with ``draw`` that many fresh held-out prompts per domain.
    Prompts and profile texts are embedded as the monitor embeds them: their first ``embed_tokens`` tokens.
    """
    settings = settings or PlannerSettings()
    fleet = load_fleet(fleet_dir)
    if draw is not None:
        prompts = drawn_prompts(fleet, draw, draw_seed)
        source = {"source": "held-out draw", "per_domain": draw, "seed": draw_seed}
    else:
        prompts = eval_prompts(fleet, limit)
        source = {"source": "fleet eval sets", "limit": limit}
    embedder = SentenceEmbedder(embedder_dir(fleet.root), max_tokens=embed_tokens)
    routing = {name: summary(evaluate(fleet, embedder, v, settings, prompts)) for name, v in VARIANTS.items()}
    exemplar_counts = {c.name: len(fleet.exemplars(c)) for c in fleet.models if not c.baseline}
    return {"routing": routing, "prompts": source, "embed_tokens": embed_tokens,
            "profile_rank": settings.profile_rank,
            "fleet": {"root": str(fleet.root), "name": fleet.name, "exemplars": exemplar_counts}}


def print_table(report: dict[str, Any], names: Sequence[str] = tuple(VARIANTS)) -> None:
    from rich.console import Console
    from rich.table import Table

    prompts = report.get("prompts", {})
    where = f"a held-out draw, seed {prompts['seed']}," if prompts.get("source") == "held-out draw" \
        else "the fleet's held-out eval sets,"
    cut = report.get("embed_tokens")
    tokens = f", prompts embedded to their first {cut} tokens" if cut else ""
    table = Table(title=f"routing accuracy on {where} semantic fit only (no QoS){tokens}")
    table.add_column("domain")
    for name in names:
        table.add_column(name.replace("_", " "), justify="right")
    routing = report["routing"]
    for domain in routing[names[0]]["domains"]:
        cells = []
        for name in names:
            d = routing[name]["domains"][domain]
            cells.append(f"{d['accuracy']:.1%} ({d['correct']}/{d['queries']})")
        table.add_row(domain, *cells)
    table.add_row("overall", *(f"{routing[n]['accuracy']:.1%}" for n in names))
    Console().print(table)


def cmd_routing(args: argparse.Namespace) -> int:
    from calm.cli import EXIT_OK, EXIT_USAGE, settings_from
    from calm.fleets import fleet_dir

    settings = settings_from(args)
    try:
        report = run(fleet_dir(settings, profile=args.profile), settings.planner, limit=args.limit,
                     draw=args.draw, draw_seed=args.draw_seed, embed_tokens=settings.ingress.embed_tokens)
    except DrawError as e:
        print(f"calm bench routing: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return EXIT_OK
