"""Units of build work that run in worker processes: one model (train → export → evaluate) or the embedder.

Jobs and outcomes are plain picklable dataclasses. Training progress goes back to the parent
through a queue installed by `init_worker` as `(model name, steps done)` tuples.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.fleet.data import DataRecipe, read_eval_set
from workers.fleet.recipes import ModelRecipe

_QUEUE: Any = None
_THREADS = 1


def use_progress_queue(queue: Any, threads: int) -> None:
    """Send training progress to `queue` (None: nowhere) and train with `threads` threads."""
    global _QUEUE, _THREADS
    _QUEUE, _THREADS = queue, threads


def init_worker(queue: Any, threads: int) -> None:
    """Pool initializer: progress queue, math libraries capped at `threads` threads, quiet warnings."""
    use_progress_queue(queue, threads)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.simplefilter("ignore")  # export tracing warnings are noise to a fleet builder's user


@dataclass(frozen=True, slots=True)
class ModelJob:
    """Train, export and evaluate one model of a fleet recipe."""

    recipe: ModelRecipe
    data: DataRecipe
    tokenizer_json: Path
    checkpoint_dir: Path
    model_dir: Path
    eval_sets: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelOutcome:
    """Measured facts about a built model, for its card."""

    name: str
    params: int
    train_steps: int
    train_tokens: int
    train_wall_s: float
    final_loss: float
    export_s: float
    eval_s: float
    quality: dict[str, float]
    cpu_s: float = 0.0


def run_model_job(job: ModelJob) -> ModelOutcome:
    """Train the model, export it to ONNX (checkpoint removed afterwards) and measure held-out quality."""
    from tokenizers import Tokenizer

    from workers.fleet.evaluate import evaluate_model
    from workers.fleet.export import export_causal_lm
    from workers.fleet.fuse import fuse_decoder, probe_prompts
    from workers.fleet.tokenizer import EOS
    from workers.fleet.train import train

    name = job.recipe.name
    cpu_start = time.process_time()

    def on_step(step: int, _loss: float) -> None:
        if _QUEUE is not None and (step % 10 == 0 or step == job.recipe.steps):
            _QUEUE.put((name, step))

    tok = Tokenizer.from_file(str(job.tokenizer_json))
    result = train(job.recipe, job.data, tok, job.checkpoint_dir, on_step=on_step, threads=_THREADS)
    start = time.perf_counter()
    export_causal_lm(job.checkpoint_dir, job.model_dir, int8=job.recipe.int8)
    if not job.recipe.int8:  # the optimizer's fusions work on float graphs
        fuse_decoder(job.model_dir, probe_prompts(job.recipe.examples, list(job.eval_sets.values())), EOS)
    export_s = time.perf_counter() - start
    shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
    start = time.perf_counter()
    sets = {domain: read_eval_set(path) for domain, path in job.eval_sets.items()}
    quality = evaluate_model(job.model_dir, sets, EOS, threads=_THREADS)
    return ModelOutcome(
        name=name,
        params=result.params,
        train_steps=result.steps,
        train_tokens=result.tokens,
        train_wall_s=result.wall_s,
        final_loss=round(result.final_loss, 4),
        export_s=round(export_s, 2),
        eval_s=round(time.perf_counter() - start, 2),
        quality=quality,
        cpu_s=round(time.process_time() - cpu_start, 2),
    )


@dataclass(frozen=True, slots=True)
class EmbedderJob:
    """Export the router's sentence embedder into `out_dir` (int8 or not, the first `layers` or all)."""

    out_dir: Path
    int8: bool = True
    layers: int = 0


def run_embedder_job(job: EmbedderJob) -> float:
    """Export the sentence embedder; returns the seconds it took."""
    from workers.fleet.export import export_embedder

    start = time.perf_counter()
    export_embedder(job.out_dir, int8=job.int8, layers=job.layers)
    if _QUEUE is not None:
        _QUEUE.put(("embedder", 1))
    return time.perf_counter() - start
