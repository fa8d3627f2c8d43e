"""Fleet manifest: model cards and the `fleet.toml` that lists them.

Runtime-safe: only the standard library and `tomli_w`; no torch, no onnxruntime.

Layout of a fleet directory::

    fleet.toml                  # [fleet] table + [[models]] array of tables
    models/<name>/model.onnx    # one ONNX export dir per model (+ tokenizer.json, config.json)
    embedder/model.onnx         # optional sentence embedder (+ tokenizer.json)
    eval/<domain>.jsonl         # optional held-out eval sets: {"prompt", "reference", "domain"}
    models/<name>/exemplars.jsonl  # optional typical prompts {"prompt"}: the router compares queries to them
"""

from __future__ import annotations

import json
import os
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomli_w

FLEET_FILE = "fleet.toml"
MODEL_FILE = "model.onnx"
DEFAULT_EOS = "<|endoftext|>"
MAX_EXEMPLARS = 2048  # as many as the router takes into a profile (calm_actors.scoring.MAX_EXEMPLARS)

_REQUIRED_CARD_FIELDS = ("name", "path", "description", "examples", "prompt_template")


class FleetError(ValueError):
    """A fleet directory or its `fleet.toml` is missing, malformed or inconsistent."""


@dataclass(frozen=True, slots=True)
class ModelCard:
    """What CALM knows about one model before running it: its specialty, size and measured quality."""

    name: str
    path: str
    description: str
    examples: tuple[str, ...]
    prompt_template: str = "{prompt}"
    domains: tuple[str, ...] = ()
    params: int = 0
    memory_mb: int = 0
    baseline: bool = False
    source: str = ""
    train_steps: int = 0
    train_tokens: int = 0
    train_wall_s: float = 0.0
    quality: Mapping[str, float] = field(default_factory=dict)
    eos_token: str = DEFAULT_EOS
    exemplars: str = ""  # optional JSONL file (relative to the fleet root) of typical prompts for routing

    def render(self, prompt: str) -> str:
        """The model input for a user prompt, per `prompt_template`."""
        return self.prompt_template.replace("{prompt}", prompt)

    def to_toml(self) -> dict[str, Any]:
        """The card as a TOML-ready table (tuples become lists; empty optional values kept)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = {str(k): float(v) for k, v in value.items()}
            out[f.name] = value
        return out

    @classmethod
    def from_toml(cls, table: Mapping[str, Any], where: str) -> ModelCard:
        """Build a card from a `[[models]]` table; `where` names the file in error messages."""
        missing = [k for k in _REQUIRED_CARD_FIELDS if k not in table]
        if missing:
            label = table.get("name", "?")
            raise FleetError(f"{where}: model {label!r} lacks required field(s) {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise FleetError(f"{where}: model {table['name']!r} has unknown field(s) {', '.join(unknown)}")
        kwargs: dict[str, Any] = dict(table)
        try:
            for key in ("examples", "domains"):
                if key in kwargs:
                    kwargs[key] = tuple(str(x) for x in _as_list(kwargs[key], key))
            for key in ("params", "memory_mb", "train_steps", "train_tokens"):
                if key in kwargs:
                    kwargs[key] = int(kwargs[key])
            if "train_wall_s" in kwargs:
                kwargs["train_wall_s"] = float(kwargs["train_wall_s"])
            if "quality" in kwargs:
                kwargs["quality"] = {str(k): float(v) for k, v in dict(kwargs["quality"]).items()}
            if "baseline" in kwargs and not isinstance(kwargs["baseline"], bool):
                raise TypeError("baseline must be true or false")
        except (TypeError, ValueError) as e:
            raise FleetError(f"{where}: model {table['name']!r}: {e}") from e
        for key in ("name", "path", "description", "prompt_template", "source", "eos_token", "exemplars"):
            if key in kwargs and not isinstance(kwargs[key], str):
                raise FleetError(f"{where}: model {table['name']!r}: {key} must be a string")
        if not kwargs["name"]:
            raise FleetError(f"{where}: a model has an empty name")
        if "{prompt}" not in kwargs["prompt_template"]:
            raise FleetError(f"{where}: model {kwargs['name']!r}: prompt_template lacks '{{prompt}}'")
        return cls(**kwargs)


def _as_list(value: Any, key: str) -> list[Any]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise TypeError(f"{key} must be a list of strings")
    return list(value)


@dataclass(frozen=True, slots=True)
class Fleet:
    """A loaded fleet directory: its models, optional embedder and held-out eval sets."""

    root: Path
    name: str
    profile: str = ""
    recipe_hash: str = ""
    embedder_path: Path | None = None
    models: tuple[ModelCard, ...] = ()
    eval_sets: Mapping[str, Path] = field(default_factory=dict)

    def model(self, name: str) -> ModelCard:
        """The card named `name`; KeyError if the fleet has none."""
        for card in self.models:
            if card.name == name:
                return card
        raise KeyError(f"fleet {self.name!r} has no model {name!r}")

    def model_dir(self, card: ModelCard) -> Path:
        """The directory holding the card's `model.onnx`."""
        return (self.root / card.path).resolve()

    def exemplars(self, card: ModelCard, limit: int = MAX_EXEMPLARS) -> tuple[str, ...]:
        """The card's exemplar prompts (at most ``limit``); FleetError naming the file when unreadable."""
        if not card.exemplars:
            return ()
        path = (self.root / card.exemplars).resolve()
        out: list[str] = []
        try:
            with path.open(encoding="utf-8") as fh:
                for number, line in enumerate(fh, 1):
                    if len(out) >= limit:
                        break
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    prompt = row.get("prompt") if isinstance(row, dict) else None
                    if not isinstance(prompt, str) or not prompt:
                        raise FleetError(f"{path}:{number}: expected {{\"prompt\": \"...\"}}")
                    out.append(prompt)
        except OSError as e:
            raise FleetError(f"{path}: cannot read exemplars of model {card.name!r}: {e.strerror}") from e
        except (ValueError, UnicodeDecodeError) as e:
            raise FleetError(f"{path}: exemplars of model {card.name!r} are not JSON lines: {e}") from e
        return tuple(out)

    def baseline(self) -> ModelCard | None:
        """The single-model baseline (the first card marked `baseline = true`), if any."""
        return next((c for c in self.models if c.baseline), None)

    @property
    def names(self) -> tuple[str, ...]:
        """Model names in manifest order."""
        return tuple(c.name for c in self.models)


def load_fleet(directory: Path | str, require_model_files: bool = True) -> Fleet:
    """Read and validate `<directory>/fleet.toml`; raise `FleetError` naming the file and the problem.

    With ``require_model_files=False`` (a worker) a missing `model.onnx` is left for the model's load to
    report, so one broken model does not take the others down.
    """
    root = Path(directory).expanduser().resolve()
    path = root / FLEET_FILE
    if not root.is_dir():
        raise FleetError(f"{root}: fleet directory does not exist")
    if not path.is_file():
        raise FleetError(f"{path}: missing (a fleet directory needs a {FLEET_FILE})")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FleetError(f"{path}: not valid TOML: {e}") from e
    head = data.get("fleet", {})
    if not isinstance(head, dict):
        raise FleetError(f"{path}: [fleet] must be a table")
    tables = data.get("models", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise FleetError(f"{path}: models must be an array of tables ([[models]])")
    if not tables:
        raise FleetError(f"{path}: lists no models (add [[models]] tables)")
    cards = tuple(ModelCard.from_toml(t, str(path)) for t in tables)
    seen: set[str] = set()
    for card in cards:
        if card.name in seen:
            raise FleetError(f"{path}: duplicate model name {card.name!r}")
        seen.add(card.name)
        onnx = root / card.path / MODEL_FILE
        if require_model_files and not onnx.is_file():
            raise FleetError(f"{path}: model {card.name!r}: {onnx} is missing")
    embedder = head.get("embedder")
    embedder_path: Path | None = None
    if embedder:
        embedder_path = (root / str(embedder)).resolve()
        if not (embedder_path / MODEL_FILE).is_file():
            raise FleetError(f"{path}: embedder {embedder_path / MODEL_FILE} is missing")
    evals = head.get("eval", {})
    if not isinstance(evals, dict):
        raise FleetError(f"{path}: fleet.eval must be a table of domain = path")
    eval_sets = {str(k): (root / str(v)).resolve() for k, v in evals.items()}
    for domain, eval_path in eval_sets.items():
        if not eval_path.is_file():
            raise FleetError(f"{path}: eval set for {domain!r} ({eval_path}) is missing")
    return Fleet(
        root=root,
        name=str(head.get("name", root.name)),
        models=cards,
        profile=str(head.get("profile", "")),
        recipe_hash=str(head.get("recipe_hash", "")),
        embedder_path=embedder_path,
        eval_sets=eval_sets,
    )


def fleet_to_toml(fleet: Fleet) -> dict[str, Any]:
    """The manifest document for `fleet` (paths stored relative to its root)."""
    head: dict[str, Any] = {"name": fleet.name}
    if fleet.profile:
        head["profile"] = fleet.profile
    if fleet.recipe_hash:
        head["recipe_hash"] = fleet.recipe_hash
    if fleet.embedder_path is not None:
        head["embedder"] = _relative(fleet.embedder_path, fleet.root)
    if fleet.eval_sets:
        head["eval"] = {d: _relative(p, fleet.root) for d, p in sorted(fleet.eval_sets.items())}
    return {"fleet": head, "models": [c.to_toml() for c in fleet.models]}


def write_fleet(fleet: Fleet) -> Path:
    """Write `<fleet.root>/fleet.toml` atomically and return its path."""
    root = Path(fleet.root)
    root.mkdir(parents=True, exist_ok=True)
    names = [c.name for c in fleet.models]
    if len(set(names)) != len(names):
        raise FleetError(f"{root / FLEET_FILE}: duplicate model names in {names}")
    text = tomli_w.dumps(fleet_to_toml(fleet))
    target = root / FLEET_FILE
    fd, tmp = tempfile.mkstemp(prefix=".fleet-", suffix=".toml", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def add_model_card(directory: Path | str, card: ModelCard, replace_existing: bool = False) -> Fleet:
    """Add `card` to the fleet in `directory` (creating `fleet.toml` if absent) and return the new fleet.

    A card with the same name raises `FleetError` unless `replace_existing` is true.
    """
    root = Path(directory).expanduser().resolve()
    if (root / FLEET_FILE).is_file():
        fleet = load_fleet(root)
    else:
        fleet = Fleet(root=root, name=root.name, models=())
    if card.name in fleet.names and not replace_existing:
        raise FleetError(f"{root / FLEET_FILE}: already has a model named {card.name!r}")
    models = (*tuple(c for c in fleet.models if c.name != card.name), card)
    fleet = replace(fleet, models=models)
    write_fleet(fleet)
    return load_fleet(root)


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)
