"""Fleets of small models: the manifest (`fleet.toml`), the offline builder and ONNX export.

`import workers.fleet` is cheap and never imports torch: the builder and exporter load their heavy
dependencies (torch, transformers, optimum) only inside the functions that need them.
"""

from __future__ import annotations

from workers.fleet.build import build_fleet
from workers.fleet.export import export_checkpoint_to_fleet
from workers.fleet.profiles import PROFILES
from workers.fleet.recipes import recipe_hash
from workers.fleet.spec import Fleet, FleetError, ModelCard, add_model_card, load_fleet, write_fleet

__all__ = [
    "PROFILES",
    "Fleet",
    "FleetError",
    "ModelCard",
    "add_model_card",
    "build_fleet",
    "export_checkpoint_to_fleet",
    "load_fleet",
    "recipe_hash",
    "write_fleet",
]
