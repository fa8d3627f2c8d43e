"""Built models kept apart from the fleets that hold them, so a recipe that changes one model retrains
only that model.

A model's key is what its files depend on: its recipe less the card text, the data recipe, its
tokenizer (domains and vocabulary size) and the builder and Python versions. Graph rewrites after
training (``workers.fleet.fuse``) are not in it: a restored model's graph may be an older version's,
and the fleet's ``refresh_graphs`` rewrites it from itself. The cache sits beside the fleet cache
(``<cache dir>/models/<name>-<key>``), each entry the model's directory plus the measured facts of its
build (``outcome.json``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

from workers.fleet.jobs import ModelOutcome
from workers.fleet.recipes import FleetRecipe, ModelRecipe, build_versions
from workers.fleet.staging import staged_dir

log = logging.getLogger(__name__)

MODELS_DIR = "models"
OUTCOME_FILE = "outcome.json"
CARD_FIELDS = frozenset({"description", "examples"})  # card text: not what is trained
KEY_GRAPHS = "1"  # was the fusion version; kept fixed so that keys of models built since stay valid


def model_key(recipe: FleetRecipe, model: ModelRecipe) -> str:
    """sha256 hex of everything ``model``'s built files depend on (not its card text)."""
    doc = {
        **build_versions(),
        "fused": KEY_GRAPHS,
        "data": dataclasses.asdict(recipe.data),
        "tokenizer": list(recipe.tokenizer_key(model)),
        "model": {k: v for k, v in dataclasses.asdict(model).items() if k not in CARD_FIELDS},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ModelCache:
    """Built model directories by name and key, under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry(self, name: str, key: str) -> Path:
        return self.root / f"{name}-{key[:16]}"

    def restore(self, name: str, key: str, model_dir: Path) -> ModelOutcome | None:
        """Copy the cached model into ``model_dir`` and return its build facts (None: not cached)."""
        source = self.entry(name, key)
        outcome = self._outcome(source)
        if outcome is None:
            return None
        shutil.copytree(source, model_dir, ignore=shutil.ignore_patterns(OUTCOME_FILE), dirs_exist_ok=True)
        log.info("reused the built model %s from %s", name, source)
        return outcome

    def store(self, name: str, key: str, model_dir: Path, outcome: ModelOutcome) -> None:
        """Keep a copy of a freshly built model (written aside, then renamed into place)."""
        target = self.entry(name, key)
        if self._outcome(target) is not None:
            return
        try:
            with staged_dir(target) as tmp:
                shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
                (tmp / OUTCOME_FILE).write_text(json.dumps(dataclasses.asdict(outcome)), encoding="utf-8")
        except OSError:
            if self._outcome(target) is None:  # not another build storing the same model meanwhile
                raise

    @staticmethod
    def _outcome(entry: Path) -> ModelOutcome | None:
        """An entry's build facts; None when it is missing or damaged (then it is rebuilt, not trusted)."""
        try:
            return ModelOutcome(**json.loads((entry / OUTCOME_FILE).read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            log.warning("ignoring the cached model %s: %s", entry, e)
            return None
