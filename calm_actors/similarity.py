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

    ``fits`` returns what ``semantic_fit`` returns for each model, for the cost of one matrix-vector
    product instead of one per model. Build it once per set of profiles, not per query.
    """

    def __init__(self, profiles: dict[str, np.ndarray]) -> None:
        self.names = tuple(profiles)
        self.matrix = np.vstack(list(profiles.values())) if profiles else np.zeros((0, 0), np.float32)
        ends = np.cumsum([m.shape[0] for m in profiles.values()], dtype=np.int64).tolist()
        self.bounds = tuple(zip([0, *ends][:-1], ends, strict=True))
        self.sums = np.vstack([m.sum(axis=0) for m in profiles.values()]) if profiles else self.matrix
        self.index = {name: i for i, name in enumerate(self.names)}

    def fits(self, embedding: np.ndarray, learned: dict[str, np.ndarray]) -> dict[str, float]:
        """Each model's cosine fit; ``learned`` rows (by model) join their model's profile."""
        if not self.names:
            return {}
        sims = self.matrix @ embedding
        centre = self.sums @ embedding
        return {name: _fit(embedding, sims[start:end], self.sums[i], float(centre[i]), learned.get(name))
                for i, (name, (start, end)) in enumerate(zip(self.names, self.bounds, strict=True))}
