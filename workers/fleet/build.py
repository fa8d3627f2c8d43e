"""`build_fleet`: turn a profile's recipe into a fleet directory, or find it in the build cache.

The cache entry is `<cache_dir>/fleets/<profile>-<hash12>/`; a hit returns at once and imports no
torch. A miss takes a per-entry file lock (one build at a time; waiters then find it built), builds
into a temporary sibling directory and renames it into place, so a crashed build never leaves a
half-written fleet under the final name. Models are built in worker processes, side by side with
one math thread each when that finishes first (small models of similar cost), or one after another
with every thread when one model outweighs the rest (the demo's baseline).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from workers.fleet.data import DataRecipe, eval_items, get_domain, tokenizer_texts, write_eval_set
from workers.fleet.fuse import FUSED_VERSION, fuse_decoder, fusion_available, probe_prompts
from workers.fleet.jobs import EmbedderJob, ModelJob, ModelOutcome
from workers.fleet.model_cache import MODELS_DIR, ModelCache, model_key
from workers.fleet.profiles import PROFILES
from workers.fleet.recipes import FleetRecipe, ModelRecipe, recipe_hash
from workers.fleet.runner import BuildError, run_jobs
from workers.fleet.spec import FLEET_FILE, MODEL_FILE, Fleet, FleetError, ModelCard, load_fleet, write_fleet
from workers.fleet.staging import staged_dir

__all__ = ["DEFAULT_CACHE_DIR", "BuildError", "build_fleet", "cache_entry"]

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/calm")


def cache_entry(cache_dir: Path, recipe: FleetRecipe) -> Path:
    """Where the fleet built from `recipe` lives in the cache."""
    return Path(cache_dir).expanduser() / "fleets" / f"{recipe.profile}-{recipe_hash(recipe)[:12]}"


def build_fleet(
    profile: str,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    out: Path | None = None,
    progress: bool = True,
    steps_scale: float = 1.0,
    workers: int | None = None,
) -> Path:
    """Build the fleet of `profile` (or find it in `cache_dir`) and return its directory.

    With `out`, the fleet is also copied there and `out` is returned. `steps_scale` shrinks every
    model's training steps (for tests; it changes the recipe hash). `workers` is the number of
    build processes (default: the split of CPUs into processes and threads that should finish first,
    see `runner.plan_workers`); each gets CPUs / workers threads.
    Worker processes are spawned, so a script calling this with `workers` > 1 needs the usual
    `if __name__ == "__main__":` guard; `workers=1` builds in this process.
    """
    if profile not in PROFILES:
        raise FleetError(f"unknown fleet profile {profile!r}; known: {', '.join(PROFILES)}")
    recipe = PROFILES[profile].scaled(steps_scale)
    entry = cache_entry(cache_dir, recipe)
    if not _complete(entry):
        entry.parent.mkdir(parents=True, exist_ok=True)
        with _locked(_fleet_lock(entry)):
            if not _complete(entry):  # another process may have built it while we waited
                _build_and_publish(recipe, entry, progress, workers)
        load_fleet(entry)
    refresh_exemplars(entry, recipe)
    refresh_graphs(entry, recipe)
    if out is None:
        return entry
    out = Path(out).expanduser().resolve()
    if _complete(out) and load_fleet(out).recipe_hash == recipe_hash(recipe):
        refresh_exemplars(out, recipe)
        refresh_graphs(out, recipe)
        return out
    if out.exists() and any(out.iterdir()):
        raise FleetError(f"{out}: exists and is not this fleet; choose an empty or new directory")
    shutil.copytree(entry, out, dirs_exist_ok=True)
    load_fleet(out)
    return out


def _complete(path: Path) -> bool:
    return (path / FLEET_FILE).is_file()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (one build per cache entry at a time)."""
    import fcntl

    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_and_publish(recipe: FleetRecipe, entry: Path, progress: bool, workers: int | None) -> None:
    """Build into a scratch sibling of `entry`, then rename it into place (a half-built leftover is replaced)."""
    models = ModelCache(entry.parent.parent / MODELS_DIR)  # beside <cache dir>/fleets
    with staged_dir(entry) as tmp:
        _build_into(recipe, tmp, progress=progress, workers=workers, models=models)


def _build_into(recipe: FleetRecipe, root: Path, progress: bool, workers: int | None,
                models: ModelCache | None = None) -> None:
    """Build every model of ``recipe`` into ``root`` (reusing those ``models`` holds) and write its fleet.toml."""
    from workers.fleet.tokenizer import train_tokenizer

    started = time.perf_counter()
    digest = recipe_hash(recipe)
    eval_paths: dict[str, Path] = {}
    for domain in recipe.domains:
        eval_paths[domain] = write_eval_set(root / "eval" / f"{domain}.jsonl", eval_items(domain, recipe.data))
    keys = {m.name: model_key(recipe, m) for m in recipe.models}
    outcomes: dict[str, ModelOutcome] = {}
    for m in recipe.models:
        reused = models.restore(m.name, keys[m.name], root / "models" / m.name) if models is not None else None
        if reused is not None:
            outcomes[m.name] = reused
    tok_paths: dict[tuple[tuple[str, ...], int], Path] = {}
    for m in recipe.models:
        key = recipe.tokenizer_key(m)
        if key not in tok_paths and m.name not in outcomes:
            domains, vocab = key
            tok_paths[key] = root / "tokenizers" / f"{'+'.join(domains)}-{vocab}.json"
            tok_paths[key].parent.mkdir(exist_ok=True)
            train_tokenizer(tokenizer_texts(domains, recipe.data), vocab).save(str(tok_paths[key]))
    jobs = [
        ModelJob(
            recipe=m,
            data=recipe.data,
            tokenizer_json=tok_paths[recipe.tokenizer_key(m)],
            checkpoint_dir=root / "checkpoints" / m.name,
            model_dir=root / "models" / m.name,
            eval_sets={d: eval_paths[d] for d in m.domains},
        )
        for m in recipe.models
        if m.name not in outcomes
    ]
    embedder = (EmbedderJob(root / "embedder", recipe.embedder_int8, recipe.embedder_layers)
                if recipe.with_embedder else None)
    built = run_jobs(jobs, embedder, progress, workers)
    if models is not None:
        for job in jobs:
            models.store(job.recipe.name, keys[job.recipe.name], job.model_dir, built[job.recipe.name])
    outcomes.update(built)
    shutil.rmtree(root / "tokenizers", ignore_errors=True)
    shutil.rmtree(root / "checkpoints", ignore_errors=True)
    for m in recipe.models:
        write_exemplars(root / "models" / m.name / EXEMPLARS_FILE, m.domains, recipe.data, recipe.exemplars_per_model)
    (root / EXEMPLARS_STAMP).write_text(_exemplars_key(recipe))
    _fuse_graphs(root, recipe)  # the jobs' graphs are current; restored ones may be an older version's
    (root / GRAPHS_STAMP).write_text(FUSED_VERSION)
    cards = tuple(_card(m, root / "models" / m.name, outcomes[m.name], digest) for m in recipe.models)
    fleet = Fleet(
        root=root,
        name=f"calm-{recipe.profile}",
        profile=recipe.profile,
        recipe_hash=digest,
        embedder_path=root / "embedder" if recipe.with_embedder else None,
        models=cards,
        eval_sets={d: p for d, p in eval_paths.items()},
    )
    write_fleet(fleet)
    log.info("built fleet %s in %.1f s", recipe.profile, time.perf_counter() - started)


def _card(m: ModelRecipe, model_dir: Path, outcome: ModelOutcome, digest: str) -> ModelCard:
    onnx = model_dir / MODEL_FILE
    return ModelCard(
        name=m.name,
        path=f"models/{m.name}",
        description=m.description,
        examples=m.examples,
        prompt_template="{prompt}",
        domains=m.domains,
        params=outcome.params,
        memory_mb=max(1, math.ceil(onnx.stat().st_size * 1.5 / 2**20)),
        baseline=m.baseline,
        source=f"calm-builder:{m.name}@{digest[:12]}",
        train_steps=outcome.train_steps,
        train_tokens=outcome.train_tokens,
        train_wall_s=outcome.train_wall_s,
        quality=outcome.quality,
        eos_token="<|endoftext|>",
        exemplars=f"models/{m.name}/{EXEMPLARS_FILE}",
    )


EXEMPLARS_FILE = "exemplars.jsonl"
EXEMPLARS_STAMP = ".exemplars"


def _exemplars_key(recipe: FleetRecipe) -> str:
    return f"{recipe.exemplars_per_model}:{EXEMPLAR_SEED}"


def _fleet_lock(root: Path) -> Path:
    """The lock a fleet directory's builds and refreshes take (beside it, so a rename keeps it)."""
    return root.parent / f".{root.name}.lock"


def _stamped(root: Path, stamp: str, value: str) -> bool:
    path = root / stamp
    return path.is_file() and path.read_text() == value


def _refresh_once(root: Path, stamp: str, value: str, refresh: Callable[[], None]) -> bool:
    """Run ``refresh`` under the fleet's lock and stamp ``root`` with ``value``, unless the stamp says so
    already (also when another process refreshed it while this one waited). True when this call did."""
    if _stamped(root, stamp, value):
        return False
    with _locked(_fleet_lock(root)):
        if _stamped(root, stamp, value):
            return False
        refresh()
        (root / stamp).write_text(value)
    return True


def refresh_exemplars(root: Path, recipe: FleetRecipe) -> None:
    """Rewrite a built fleet's exemplar files when the recipe asks for another count (no retraining)."""

    def rewrite() -> None:
        for m in recipe.models:
            target = root / "models" / m.name / EXEMPLARS_FILE
            tmp = target.with_suffix(".tmp")
            write_exemplars(tmp, m.domains, recipe.data, recipe.exemplars_per_model)
            tmp.replace(target)

    if _refresh_once(root, EXEMPLARS_STAMP, _exemplars_key(recipe), rewrite):
        log.info("wrote %d exemplars per model into %s", recipe.exemplars_per_model, root)


GRAPHS_STAMP = ".graphs"


def refresh_graphs(root: Path, recipe: FleetRecipe) -> None:
    """Fuse the decoder graphs of a fleet built before the builder fused them (no retraining; each fused
    graph is checked token for token against the one it replaces, see ``workers.fleet.fuse``)."""
    if not _stamped(root, GRAPHS_STAMP, FUSED_VERSION) and not fusion_available():
        log.info("%s: decoder graphs left unfused (fusing needs the `build` extra's onnx package)", root)
        return
    if _refresh_once(root, GRAPHS_STAMP, FUSED_VERSION, lambda: _fuse_graphs(root, recipe)):
        log.info("fused the decoder graphs of %s", root)


def _fuse_graphs(root: Path, recipe: FleetRecipe) -> None:
    """Bring every float model's graph in ``root`` to the current fusion version (current ones: a metadata read)."""
    from workers.fleet.tokenizer import EOS

    for m in recipe.models:
        if not m.int8:
            evals = [root / "eval" / f"{domain}.jsonl" for domain in m.domains]
            fuse_decoder(root / "models" / m.name, probe_prompts(m.examples, evals), EOS)


def write_exemplars(path: Path, domains: tuple[str, ...], data: DataRecipe, n: int) -> Path:
    """Write ``n`` training-split prompts, spread over ``domains``, as JSON lines ``{"prompt"}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    share = max(1, n // max(1, len(domains)))
    with path.open("w", encoding="utf-8") as fh:
        for domain in domains:
            for prompt in get_domain(domain, data).exemplars(share, seed=EXEMPLAR_SEED):
                fh.write(json.dumps({"prompt": prompt, "domain": domain}, ensure_ascii=False) + "\n")
    return path


EXEMPLAR_SEED = 7
