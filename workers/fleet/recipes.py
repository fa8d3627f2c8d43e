"""Fleet recipes as data: which models to train, on what, how big and for how long.

`recipe_hash` fingerprints a recipe (plus the builder version and Python minor version, since the
code and prose corpora come from the running interpreter) and names the build cache entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from workers.fleet.data import DataRecipe

BUILDER_VERSION = "3"


@dataclass(frozen=True, slots=True)
class DomainPlan:
    """Training steps on one domain with that domain's batch shape (rows × max tokens per row)."""

    domain: str
    steps: int
    batch: int
    seq_len: int


@dataclass(frozen=True, slots=True)
class ModelRecipe:
    """One model: its size, its data plan (steps interleaved across domains) and its card text."""

    name: str
    description: str
    examples: tuple[str, ...]
    plan: tuple[DomainPlan, ...]
    hidden: int
    layers: int
    heads: int
    intermediate: int
    lr: float
    seed: int
    baseline: bool = False
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    weight_decay: float = 0.01
    max_positions: int = 512
    int8: bool = False
    tokenizer_domains: tuple[str, ...] = ()
    vocab_size: int = 0

    @property
    def domains(self) -> tuple[str, ...]:
        """Domains this model is trained on, in plan order."""
        return tuple(p.domain for p in self.plan)

    @property
    def steps(self) -> int:
        """Total optimizer steps."""
        return sum(p.steps for p in self.plan)

    def token_budget(self) -> int:
        """Upper bound on tokens seen: Σ steps × batch × seq_len."""
        return sum(p.steps * p.batch * p.seq_len for p in self.plan)

    def scaled(self, steps_scale: float) -> ModelRecipe:
        """The same recipe with every domain's steps multiplied by `steps_scale` (at least 1 step)."""
        plan = tuple(dataclasses.replace(p, steps=max(1, round(p.steps * steps_scale))) for p in self.plan)
        return dataclasses.replace(self, plan=plan)


@dataclass(frozen=True, slots=True)
class FleetRecipe:
    """A whole fleet: shared tokenizer size, data settings and the models."""

    profile: str
    models: tuple[ModelRecipe, ...]
    vocab_size: int
    data: DataRecipe = field(default_factory=DataRecipe)
    embedder_int8: bool = True
    with_embedder: bool = True
    embedder_layers: int = 0  # the router embedder's first N encoder layers (0: all)
    # Training-split prompts each model ships for routing. Derived data, not part of the trained
    # artefact: left out of the recipe hash and refreshed in place in a cached fleet when it changes.
    exemplars_per_model: int = 64

    @property
    def domains(self) -> tuple[str, ...]:
        """Every domain any model trains on, in first-seen order."""
        out: list[str] = []
        for model in self.models:
            out.extend(d for d in model.domains if d not in out)
        return tuple(out)

    def tokenizer_domains(self, model: ModelRecipe) -> tuple[str, ...]:
        """Domains `model`'s tokenizer is trained on: its own `tokenizer_domains`, else the fleet's."""
        return model.tokenizer_domains or self.domains

    def tokenizer_key(self, model: ModelRecipe) -> tuple[tuple[str, ...], int]:
        """(domains, vocab size) of `model`'s tokenizer; models with equal keys share one tokenizer."""
        return self.tokenizer_domains(model), model.vocab_size or self.vocab_size

    def scaled(self, steps_scale: float) -> FleetRecipe:
        """The recipe with every model's steps scaled (tests use this to build quickly)."""
        if steps_scale == 1.0:
            return self
        return dataclasses.replace(self, models=tuple(m.scaled(steps_scale) for m in self.models))


DERIVED_FIELDS = frozenset({"exemplars_per_model"})  # recipe fields that do not change what is trained
# Fields added after fleets were built with them, by the value that reproduces those builds: left out of the
# hash at that value, so existing fleets keep their hash (and their cache directory).
LATER_FIELDS: Mapping[str, object] = MappingProxyType({"embedder_layers": 0})


def build_versions() -> dict[str, str]:
    """The builder and Python versions a built artefact depends on (the corpora come from the interpreter)."""
    return {"builder_version": BUILDER_VERSION, "python": f"{sys.version_info.major}.{sys.version_info.minor}"}


def canonical_json(recipe: FleetRecipe) -> str:
    """The recipe as sorted, compact JSON, with the builder and Python versions."""
    doc = {
        **build_versions(),
        "recipe": {k: v for k, v in dataclasses.asdict(recipe).items()
                   if k not in DERIVED_FIELDS and not (k in LATER_FIELDS and LATER_FIELDS[k] == v)},
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def recipe_hash(profile: str | FleetRecipe) -> str:
    """sha256 hex of the canonical recipe JSON of `profile` (a profile name or a recipe)."""
    from workers.fleet.profiles import PROFILES

    recipe = PROFILES[profile] if isinstance(profile, str) else profile
    return hashlib.sha256(canonical_json(recipe).encode("utf-8")).hexdigest()
