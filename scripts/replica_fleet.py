"""Make a residency test fleet: N named replicas of an existing fleet's models, sharing its files.

Usage: python scripts/replica_fleet.py SOURCE_FLEET TARGET_DIR --models 10

Each replica is a card of its own (``m0``, ``m1`` ...) whose ``path`` is the source model's directory, so
every replica is a separate ONNX session when loaded (the worker counts its memory and load time) while
no model file is copied. Specialists are taken in turn; baselines are left out. The embedder and eval
sets are the source's. Meant for ``calm bench residency --live`` with more models than a fleet has.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from workers.fleet.spec import Fleet, load_fleet, write_fleet


def replica_fleet(source: Fleet, target: Path, count: int) -> Fleet:
    """The fleet of ``count`` replicas of ``source``'s specialists, rooted at ``target``."""
    specialists = [c for c in source.models if not c.baseline]
    if not specialists:
        raise SystemExit(f"{source.root}: no specialist to replicate")
    cards = []
    for i in range(count):
        card = specialists[i % len(specialists)]
        exemplars = str((source.root / card.exemplars).resolve()) if card.exemplars else ""
        cards.append(replace(card, name=f"m{i}", path=str((source.root / card.path).resolve()),
                             description=f"Replica {i} of {card.name}. {card.description}",
                             source=f"{card.source} (replica m{i})", exemplars=exemplars))
    return Fleet(root=target.resolve(), name=f"{source.name}-replicas-{count}", models=tuple(cards),
                 embedder_path=source.embedder_path, eval_sets=dict(source.eval_sets))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="fleet directory to take models from")
    parser.add_argument("target", type=Path, help="directory of the new fleet.toml")
    parser.add_argument("--models", type=int, default=10, help="how many replicas (default 10)")
    args = parser.parse_args()
    fleet = replica_fleet(load_fleet(args.source), args.target, args.models)
    print(write_fleet(fleet).parent)


if __name__ == "__main__":
    main()
