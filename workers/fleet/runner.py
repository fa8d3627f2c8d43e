"""Running a fleet's build jobs: in spawned worker processes, longest first (or in-process with one
worker, shortest first: the same total, and the quick models' results come out early), with rich
progress bars on stderr fed by the workers' step counts. Each model's outcome is logged as it ends.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, wait
from queue import Empty, SimpleQueue
from typing import Any

from workers.fleet import jobs as jobs_module
from workers.fleet.data import PAIR_DOMAINS
from workers.fleet.jobs import EmbedderJob, ModelJob, ModelOutcome, init_worker, run_embedder_job, run_model_job
from workers.fleet.recipes import ModelRecipe

log = logging.getLogger(__name__)


class BuildError(RuntimeError):
    """Training, exporting or evaluating one of the fleet's models failed."""


def training_cost(m: ModelRecipe) -> float:
    """Rough training cost (parameters × tokens): the longest jobs start first."""
    per_layer = 4 * m.hidden**2 + 3 * m.hidden * m.intermediate
    pair_tokens = sum(p.steps * p.batch * 12 for p in m.plan if p.domain in PAIR_DOMAINS)
    text_tokens = sum(p.steps * p.batch * p.seq_len for p in m.plan if p.domain not in PAIR_DOMAINS)
    return float(m.layers * per_layer * (pair_tokens + text_tokens))


THREAD_EFFICIENCY = 0.87  # speed-up per doubling of a job's threads: the demo generalist's training step
#                            took 2.01 s on 1 thread and 1.16 s on 2 (a 2-core machine)


def _makespan(costs: list[float], workers: int) -> float:
    """Longest-first greedy schedule of `costs` on `workers` equal workers: when the last job ends."""
    loads = [0.0] * workers
    for cost in sorted(costs, reverse=True):
        loads[loads.index(min(loads))] += cost
    return max(loads)


def plan_workers(costs: list[float], cpus: int) -> tuple[int, int]:
    """(worker processes, threads each) that should finish jobs of these costs first on `cpus` CPUs.

    More processes run jobs side by side; more threads speed each job up, but less than linearly. When
    one job outweighs the rest (a large baseline beside small specialists), fewer processes with more
    threads finish sooner. Ties go to more processes.
    """
    best: tuple[float, int] = (float("inf"), 1)
    for workers in range(min(cpus, max(1, len(costs))), 0, -1):
        threads = max(1, cpus // workers)
        speedup = threads * THREAD_EFFICIENCY ** math.log2(threads)
        best = min(best, (_makespan(costs, workers) / speedup, -workers))
    return -best[1], max(1, cpus // -best[1])


def run_jobs(
    jobs: list[ModelJob], embedder: EmbedderJob | None, progress: bool, workers: int | None
) -> dict[str, ModelOutcome]:
    """Run every model job (and the embedder export) and return the outcomes by model name."""
    cpus = _cpus()
    if workers:
        n_workers, threads = workers, max(1, cpus // workers)
    else:
        n_workers, threads = plan_workers([training_cost(j.recipe) for j in jobs], cpus)
    ordered = sorted(jobs, key=lambda j: training_cost(j.recipe), reverse=n_workers > 1)
    with _progress_bars(progress, jobs, embedder is not None) as bars:
        if n_workers == 1:
            return _run_serial(ordered, embedder, bars, threads)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        with ProcessPoolExecutor(
            max_workers=n_workers, mp_context=ctx, initializer=init_worker, initargs=(queue, threads)
        ) as pool:
            futures: dict[Future[Any], str] = {pool.submit(run_model_job, j): j.recipe.name for j in ordered}
            if embedder is not None:
                futures[pool.submit(run_embedder_job, embedder)] = "embedder"
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.2)
                _drain(queue, bars)
                for fut in done:
                    error = fut.exception()
                    if error is not None:
                        for other in pending:
                            other.cancel()
                        raise BuildError(f"building {futures[fut]!r} failed: {error}") from error
                    if futures[fut] != "embedder":
                        _log_outcome(fut.result())
            _drain(queue, bars)
    return {name: fut.result() for fut, name in futures.items() if name != "embedder"}


def _run_serial(
    jobs: list[ModelJob], embedder: EmbedderJob | None, bars: dict[str, Any], threads: int
) -> dict[str, ModelOutcome]:
    """Run every job in this process (`workers=1`: no child processes, so no `__main__` guard needed)."""
    queue: SimpleQueue[tuple[str, int]] = SimpleQueue()
    outcomes: dict[str, ModelOutcome] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jobs_module.use_progress_queue(queue, threads)
        try:
            for job in jobs:
                outcomes[job.recipe.name] = run_model_job(job)
                _drain(queue, bars)
                _log_outcome(outcomes[job.recipe.name])
            if embedder is not None:
                run_embedder_job(embedder)
                _drain(queue, bars)
        finally:
            jobs_module.use_progress_queue(None, 1)
    return outcomes


def _log_outcome(o: ModelOutcome) -> None:
    log.info(
        "%s: %d params, %d steps, final loss %.4f, train %.1f s, export %.1f s, eval %.1f s, cpu %.1f s, %s",
        o.name,
        o.params,
        o.train_steps,
        o.final_loss,
        o.train_wall_s,
        o.export_s,
        o.eval_s,
        o.cpu_s,
        o.quality,
    )


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _drain(queue: Any, bars: dict[str, Any]) -> None:
    while True:
        try:
            name, step = queue.get_nowait()
        except Empty:
            return
        update = bars.get(name)
        if update is not None:
            update(step)


@contextlib.contextmanager
def _progress_bars(enabled: bool, jobs: list[ModelJob], embedder: bool) -> Iterator[dict[str, Any]]:
    """Rich progress bars on stderr (one per model, counting training steps); no-ops when disabled."""
    if not enabled:
        yield {}
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as prog:
        bars: dict[str, Any] = {}
        for job in jobs:
            task = prog.add_task(job.recipe.name, total=job.recipe.steps)
            bars[job.recipe.name] = lambda step, t=task: prog.update(t, completed=step)
        if embedder:
            task = prog.add_task("embedder", total=1)
            bars["embedder"] = lambda step, t=task: prog.update(t, completed=step)
        yield bars
