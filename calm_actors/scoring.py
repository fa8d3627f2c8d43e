"""The Analyze step: semantic fit and predicted QoS of every model for one query (pure functions)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from broker.config import PlannerSettings
from broker.messages import Candidate, Query
from calm_actors.domain_classifier import ClassifierError, DomainClassifier
from calm_actors.fleetview import FleetView, ModelView
from calm_actors.similarity import StackedProfiles

DEFAULT_MS_PER_TOKEN = 5.0  # prior for a model with no telemetry yet (optimistic: it gets tried)
DEFAULT_LOAD_S = 1.0
DEFAULT_ENERGY_PER_TOKEN_J = 0.05


LEARNED_MIN_SAMPLES = 5


MAX_EXEMPLARS = 2048  # exemplar prompts per model that join its routing profile


def profile_texts(name: str, description: str, examples: Sequence[str], exemplars: Sequence[str]) -> list[str]:
    """The texts a model's routing profile embeds: description (or name), card examples, exemplars."""
    return [description or name, *examples, *exemplars[:MAX_EXEMPLARS]]


def learned_row(model: ModelView) -> np.ndarray | None:
    state = model.state
    if state.learned is None or state.learned_n < LEARNED_MIN_SAMPLES:
        return None
    vector = np.frombuffer(state.learned, dtype=np.float32)
    if vector.shape[0] != model.profile.shape[1]:
        return None
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else None


def expected_tokens(query: Query) -> int:
    return max(1, query.max_new_tokens)


def predict(query: Query, model: ModelView, fit: float, view: FleetView, cosine: float = 0.0) -> Candidate:
    """Predicted latency, energy and quality of running ``query`` on ``model`` now."""
    state = model.state
    tokens = expected_tokens(query)
    ms_per_token = state.ms_per_token if state.ms_per_token is not None else DEFAULT_MS_PER_TOKEN
    # Observed mean latency already includes typical output lengths; per-token cost covers longer asks.
    service_ms = state.latency_ms if state.latency_ms is not None else ms_per_token * tokens
    service_ms = max(service_ms, ms_per_token * min(tokens, 8))
    replicas = max(1, len(model.loaded_on))
    queue_ms = model.backlog * service_ms / replicas
    loaded = bool(model.loaded_on)
    load_ms = 0.0 if loaded else 1000.0 * (state.load_s if state.load_s is not None else DEFAULT_LOAD_S)
    energy_per_token = (
        state.energy_per_token_j if state.energy_per_token_j is not None else DEFAULT_ENERGY_PER_TOKEN_J
    )
    energy = state.energy_j if state.energy_j is not None else energy_per_token * tokens
    quality = state.confidence if state.confidence is not None else 0.5
    age_s = (view.refreshed_ms - state.qos_at_ms) / 1000 if state.qos_at_ms else 1e9
    return Candidate(
        model=state.name, fit=fit, latency_ms=service_ms + queue_ms + load_ms, energy_j=energy,
        quality=quality, error_rate=state.error_rate, loaded=loaded, queue=model.backlog, load_ms=load_ms,
        age_s=max(0.0, age_s), requests=state.requests, cosine=cosine,
    )


def score_all(query: Query, embedding: np.ndarray, view: FleetView, settings: PlannerSettings) -> list[Candidate]:
    """A candidate for every routable model whose context can hold the prompt.

    Each candidate's ``fit`` is its share of the semantic fit (see ``blended_fits``): cosines of related
    specialists differ by a few hundredths, which QoS terms would drown; as shares, the model that fits
    clearly better keeps the query, and QoS decides between models that fit about equally well.
    """
    models = [m for m in view.models.values() if fits_context(query, m.state.max_context)]
    stacked = view.stacked
    if stacked is None or any(m.state.name not in stacked.index for m in models):
        stacked = StackedProfiles({m.state.name: m.profile for m in models})  # a view built without them
    learned = {m.state.name: row for m in models if (row := learned_row(m)) is not None}
    every = stacked.fits(embedding, learned)
    raw = [every[m.state.name] for m in models]
    fits = blended_fits([m.state.name for m in models], [m.state.baseline for m in models], raw, embedding,
                        query.prompt, view.classifier, settings)
    return [predict(query, m, fit, view, cosine) for m, fit, cosine in zip(models, fits, raw, strict=True)]


def blended_fits(names: Sequence[str], baseline: Sequence[bool], cosines: Sequence[float], embedding: np.ndarray,
                 text: str, classifier: DomainClassifier | None, settings: PlannerSettings) -> list[float]:
    """Fit shares: a softmax over cosine fits, sharpened between specialists by the domain classifier.

    The cosine softmax (``planner.fit_temperature``) splits the fit among all models. When a classifier
    knows every specialist among them, each specialist's share becomes ``(1 - w)·cosine share + w·p·S``,
    where ``p`` is the classifier's probability over the specialists, ``S`` their summed cosine share and
    ``w`` = ``planner.classifier_weight``; baselines keep their cosine share.
    """
    shares = fit_shares(list(cosines), settings.fit_temperature)
    w = settings.classifier_weight
    specialists = [n for n, b in zip(names, baseline, strict=True) if not b]
    if classifier is None or w <= 0 or len(specialists) < 2 or not set(specialists) <= set(classifier.models):
        return shares
    try:
        p = classifier.probabilities(embedding, text, specialists, settings.classifier_temperature)
    except ClassifierError:
        return shares
    mass = sum(s for s, b in zip(shares, baseline, strict=True) if not b)
    return [s if b else (1 - w) * s + w * p[n] * mass for n, b, s in zip(names, baseline, shares, strict=True)]


def fit_shares(raw: list[float], temperature: float) -> list[float]:
    """Softmax of ``raw`` at ``temperature`` (the raw values when it is 0 or there is one model)."""
    if temperature <= 0 or len(raw) < 2:
        return raw
    z = np.asarray(raw, dtype=np.float64) / temperature
    e = np.exp(z - z.max())
    return [float(x) for x in e / e.sum()]


BYTES_PER_TOKEN_LOW = 1.0  # byte-level BPE: never more tokens than bytes


def fits_context(query: Query, max_context: int) -> bool:
    """Whether the prompt (estimated conservatively from its size) leaves room in the model's context."""
    if max_context <= 0:
        return True
    return len(query.prompt.encode("utf-8")) / BYTES_PER_TOKEN_LOW < max_context


def domain_of(candidates: list[Candidate], view: FleetView) -> str:
    """The domain of the best-fitting non-baseline model: the query's topic as the fleet sees it."""
    best = None
    for c in candidates:
        model = view.models.get(c.model)
        if model is None or model.state.baseline:
            continue
        if best is None or c.fit > best.fit:
            best = c
    if best is None:
        return ""
    return view.models[best.model].state.domain
