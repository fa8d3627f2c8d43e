"""Scoring a model's answer against a reference, per domain.

Runtime-safe (no torch). Exact-match domains compare stripped strings; continuation domains use
chrF (sacrebleu, imported only when needed) on the prediction cut to the reference's length, so a
model that keeps generating past the reference span is judged on the same span.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from broker.kb import QUALITY_SE_SUFFIX

EXACT_MATCH = "exact_match"
CHRF = "chrf"

METRICS: Mapping[str, str] = {
    "arithmetic": EXACT_MATCH,
    "sorting": EXACT_MATCH,
    "code": CHRF,
    "prose": CHRF,
}


def metric_for(domain: str) -> str:
    """The metric name used for `domain` (exact match for unknown domains)."""
    return METRICS.get(domain, EXACT_MATCH)


def score(domain: str, prediction: str, reference: str) -> float:
    """Score one prediction: 1.0/0.0 for exact-match domains, chrF in 0-100 for code and prose."""
    if metric_for(domain) == EXACT_MATCH:
        return 1.0 if prediction.strip() == reference.strip() else 0.0
    return chrf(prediction[: len(reference)], reference)


def chrf(prediction: str, reference: str) -> float:
    """Sentence-level chrF (0-100) of `prediction` against one `reference`."""
    from sacrebleu.metrics import CHRF as _CHRF  # lazy: only continuation domains need it

    if not reference:
        return 100.0 if not prediction else 0.0
    return float(_CHRF().sentence_score(prediction, [reference]).score)


def aggregate(domain: str, scores: Iterable[float]) -> dict[str, float]:
    """Mean of per-item scores as `{metric: value}` (exact match as a fraction, chrF in 0-100), and with
    two or more items its standard error as `{metric}_se` (sample deviation / √n)."""
    values = list(scores)
    n = len(values)
    mean = sum(values) / n if values else 0.0
    out = {metric_for(domain): round(mean, 4)}
    if n >= 2:
        variance = sum((v - mean) ** 2 for v in values) / (n - 1)
        out[metric_for(domain) + QUALITY_SE_SUFFIX] = round(math.sqrt(variance / n), 4)
    return out
