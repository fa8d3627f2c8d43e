"""Cosine fit of a query to a model's routing profile: nearest neighbours plus centroid (pure numpy)."""

from __future__ import annotations

import numpy as np

NEIGHBOURS = 3  # profile rows averaged for the nearest-neighbour part of the fit
CENTROID_WEIGHT = 0.3  # the rest goes to the nearest neighbours
RERANK_ROWS = 16  # rows per model whose cosines a projected first pass hands on to be computed exactly
MIN_RETAINED = 0.95  # a projection keeping less of the rows' squared length is not used (one exact pass)


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

    With ``rank`` (0 < rank < dim), the product runs in two passes: the query and the rows projected on
    the rows' ``rank`` principal axes find each model's ``RERANK_ROWS`` nearest rows, whose cosines are
    then computed exactly. The scan reads ``rank / dim`` of the bytes; a fit differs from the one-pass
    fit only when one of a model's nearest rows falls outside its projected candidates (see the README).
    Rows the axes describe poorly (less than ``min_retained`` of their squared length kept) get the one
    exact pass; ``retained`` says what the projection kept (None: not used).
    """

    def __init__(self, profiles: dict[str, np.ndarray], rank: int = 0, min_retained: float = MIN_RETAINED) -> None:
        self.names = tuple(profiles)
        self.parts = tuple(np.asarray(m, dtype=np.float32) for m in profiles.values())
        matrix = np.vstack(self.parts) if profiles else np.zeros((0, 0), np.float32)
        self.basis: np.ndarray | None = None
        self.retained: float | None = None
        if 0 < rank < matrix.shape[1] and matrix.shape[0] > RERANK_ROWS * len(profiles):
            basis, retained = principal_axes(matrix, rank)
            if retained >= min_retained:
                self.basis, self.retained = basis, retained
        self.columns = column_major(matrix if self.basis is None else matrix @ self.basis)
        ends = np.cumsum([m.shape[0] for m in profiles.values()], dtype=np.int64).tolist()
        self.bounds = tuple(zip([0, *ends][:-1], ends, strict=True))
        self.sums = np.vstack([m.sum(axis=0) for m in profiles.values()]) if profiles else matrix
        self.index = {name: i for i, name in enumerate(self.names)}

    def fits(self, embedding: np.ndarray, learned: dict[str, np.ndarray]) -> dict[str, float]:
        """Each model's cosine fit; ``learned`` rows (by model) join their model's profile."""
        if not self.names:
            return {}
        centre = self.sums @ embedding  # one row per model: too small for the layout to matter
        sims = embedding @ self.columns if self.basis is None else (embedding @ self.basis) @ self.columns
        return {name: _fit(embedding, self._nearest(i, sims[start:end], embedding), self.sums[i], float(centre[i]),
                           learned.get(name))
                for i, (name, (start, end)) in enumerate(zip(self.names, self.bounds, strict=True))}

    def _nearest(self, i: int, sims: np.ndarray, embedding: np.ndarray) -> np.ndarray:
        """Model ``i``'s row cosines for the fit: all of them from the exact pass; from a projected pass, the
        exact cosines of its ``RERANK_ROWS`` best-scoring rows."""
        if self.basis is None:
            return sims
        rows = self.parts[i]
        if sims.shape[0] > RERANK_ROWS:
            rows = rows[np.argpartition(sims, sims.shape[0] - RERANK_ROWS)[-RERANK_ROWS:]]
        return rows @ embedding


def principal_axes(rows: np.ndarray, rank: int) -> tuple[np.ndarray, float]:
    """The ``rank`` directions (``dim x rank``, float32) that keep most of the rows' squared length, and
    the share of it they keep."""
    rows64 = np.asarray(rows, dtype=np.float64)
    values, vectors = np.linalg.eigh(rows64.T @ rows64)  # ascending
    total = float(values.sum())
    kept = float(values[::-1][:rank].sum()) / total if total > 0 else 0.0
    return np.ascontiguousarray(vectors[:, ::-1][:, :rank], dtype=np.float32), kept


def column_major(rows: np.ndarray) -> np.ndarray:
    """``rows`` transposed into contiguous memory, for ``vector @ column_major(rows)`` (= ``rows @ vector``).

    The product reads every element once either way, but with one BLAS thread (CALM's processes set
    ``OPENBLAS_NUM_THREADS=1``) OpenBLAS's kernel for this layout runs 2-3x faster: measured 2026-11-30
    on a 2-core AMD EPYC, 10,269 x 384 float32 profile rows, 0.42-0.67 ms against 0.74-1.56 ms warm and
    1.1-1.3 against 1.7-2.1 ms after the caches were flushed.
    """
    return np.ascontiguousarray(rows.T, dtype=np.float32)
