"""Cosine fit of a query to a model's routing profile: nearest neighbours plus centroid (pure numpy)."""

from __future__ import annotations

import numpy as np

NEIGHBOURS = 3  # profile rows averaged for the nearest-neighbour part of the fit
CENTROID_WEIGHT = 0.3  # the rest goes to the nearest neighbours


def semantic_fit(embedding: np.ndarray, profile: np.ndarray, learned: np.ndarray | None = None) -> float:
    """Cosine fit of a query to a model: mostly its ``NEIGHBOURS`` nearest profile rows, partly the centroid.

    The profile holds the card's description and examples plus the exemplars its fleet ships (prompts
    from the model's training data). ``learned`` (the centroid of queries the model served well) joins it
    as one more row. (The cosine to the centroid is the cosine to the rows' sum.)
    """
    total = profile.sum(axis=0)
    return _fit(embedding, profile @ embedding, total, float(total @ embedding), learned)


def _fit(embedding: np.ndarray, sims: np.ndarray, total: np.ndarray, total_dot: float,
         learned: np.ndarray | None) -> float:
    """The fit from a model's row cosines ``sims`` and row sum ``total`` (``total_dot`` = total · embedding)."""
    k = min(NEIGHBOURS, sims.shape[0])
    nearest = np.partition(sims, sims.shape[0] - k)[-k:]
    if learned is not None:
        total = total + learned
        learned_sim = float(learned @ embedding)
        total_dot += learned_sim
        if k < NEIGHBOURS:
            nearest = np.append(nearest, learned_sim)
        elif learned_sim > nearest.min():
            nearest[nearest.argmin()] = learned_sim
    norm = float(np.linalg.norm(total)) or 1.0
    return float(CENTROID_WEIGHT * total_dot / norm + (1 - CENTROID_WEIGHT) * nearest.mean())


class StackedProfiles:
    """Every model's profile rows in one matrix, so one product scores a query against the whole fleet.

    ``fits`` returns what ``semantic_fit`` returns for each model, for the cost of one vector-matrix
    product instead of one per model. Build it once per set of profiles, not per query. The rows are
    kept as columns (``dim x rows``, contiguous): single-threaded OpenBLAS multiplies a vector by that
    layout 2-3x faster than a row-major matrix by a vector (see ``column_major``).
    """

    def __init__(self, profiles: dict[str, np.ndarray]) -> None:
        self.names = tuple(profiles)
        matrix = np.vstack(list(profiles.values())) if profiles else np.zeros((0, 0), np.float32)
        self.columns = column_major(matrix)
        ends = np.cumsum([m.shape[0] for m in profiles.values()], dtype=np.int64).tolist()
        self.bounds = tuple(zip([0, *ends][:-1], ends, strict=True))
        self.sums = np.vstack([m.sum(axis=0) for m in profiles.values()]) if profiles else matrix
        self.index = {name: i for i, name in enumerate(self.names)}

    def fits(self, embedding: np.ndarray, learned: dict[str, np.ndarray]) -> dict[str, float]:
        """Each model's cosine fit; ``learned`` rows (by model) join their model's profile."""
        if not self.names:
            return {}
        sims = embedding @ self.columns
        centre = self.sums @ embedding  # one row per model: too small for the layout to matter
        return {name: _fit(embedding, sims[start:end], self.sums[i], float(centre[i]), learned.get(name))
                for i, (name, (start, end)) in enumerate(zip(self.names, self.bounds, strict=True))}


def column_major(rows: np.ndarray) -> np.ndarray:
    """``rows`` transposed into contiguous memory, for ``vector @ column_major(rows)`` (= ``rows @ vector``).

    The product reads every element once either way, but with one BLAS thread (CALM's processes set
    ``OPENBLAS_NUM_THREADS=1``) OpenBLAS's kernel for this layout runs 2-3x faster: measured 2026-11-30
    on a 2-core AMD EPYC, 10,269 x 384 float32 profile rows, 0.42-0.67 ms against 0.74-1.56 ms warm and
    1.1-1.3 against 1.7-2.1 ms after the caches were flushed.
    """
    return np.ascontiguousarray(rows.T, dtype=np.float32)
