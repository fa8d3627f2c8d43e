"""A linear classifier over the specialists' profile texts: it sharpens semantic fit where cosines tie.

Nearest-neighbour cosine on sentence embeddings separates unrelated domains well, but two text domains
that share vocabulary (code with docstrings, prose with code samples) differ by a few hundredths of a
cosine. A discriminative layer trained on the very texts that make up the routing profiles (card
description, examples, exemplars) separates them far better, the more so with surface features the
embedder cannot see: hashed character n-grams (indentation, punctuation, identifiers) and line layout.

Training is a class-balanced, one-vs-rest ridge regression in closed form (the dual while there are
fewer rows than features, the primal beyond): deterministic, seconds for several thousand rows. The
monitor trains it whenever a specialist's profile changes and stores it in the KB; the analyzer reads
it when its digest changes.
A model with only a card (description and a few examples) is a class like any other: no retraining of
any model, just of this layer, automatically.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import msgpack
import numpy as np

NGRAM_BUCKETS = 1 << 12  # 4096: as accurate as 16384 on the demo fleet, a quarter of the memory
NGRAM_SIZES = (1, 2, 3, 4, 5)
MAX_FEATURE_BYTES = 2048  # prompts are cut here for the surface features (the embedder has its own cap)
MAX_INDENT = 16
LAYOUT_DIM = MAX_INDENT + 1 + 4 + 3  # indentation histogram, indentation mod 4, symbol/upper/line-length
TEXT_DIM = NGRAM_BUCKETS + LAYOUT_DIM
FORMAT_VERSION = 1
RECENT_SCORES = 4096  # (text, embedding) pairs whose scores a classifier remembers


class ClassifierError(ValueError):
    """A stored classifier cannot be decoded or does not match the embedding size."""


_HASH_STEP = np.uint32(0x01000193)  # FNV prime: the rolling hash's multiplier
_HASH_MIX = np.uint32(0x9E3779B1)  # Fibonacci hashing spreads the rolling hash over the buckets
_BUCKET_SHIFT = np.uint32(32 - (NGRAM_BUCKETS.bit_length() - 1))


def ngram_features(text: str) -> np.ndarray:
    """Hashed byte n-gram counts (sizes ``NGRAM_SIZES``), log-scaled and L2-normalised.

    Vectorised: the hash of each n-gram is built from the (n-1)-gram's, in wrapping uint32 arithmetic.
    """
    data = np.frombuffer(text.encode("utf-8", "replace")[:MAX_FEATURE_BYTES], dtype=np.uint8).astype(np.uint32)
    counts = np.zeros(NGRAM_BUCKETS, dtype=np.float32)
    rolling = np.zeros(0, dtype=np.uint32)
    with np.errstate(over="ignore"):
        for n in range(1, max(NGRAM_SIZES) + 1):
            if data.shape[0] < n:
                break
            rolling = data[n - 1:] + np.uint32(n) if n == 1 else rolling[:-1] * _HASH_STEP + data[n - 1:]
            if n in NGRAM_SIZES:
                counts += np.bincount((rolling * _HASH_MIX) >> _BUCKET_SHIFT, minlength=NGRAM_BUCKETS)
    np.log1p(counts, out=counts)
    norm = float(np.linalg.norm(counts))
    return counts / norm if norm > 0 else counts


def layout_features(text: str) -> np.ndarray:
    """Shares of non-blank lines by indentation (exact, and modulo 4), symbol and capital ratios, line length."""
    out = np.zeros(LAYOUT_DIM, dtype=np.float32)
    text = text[:MAX_FEATURE_BYTES]
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return out
    for line in lines:
        indent = len(line) - len(line.lstrip(" "))
        out[min(indent, MAX_INDENT)] += 1
        out[MAX_INDENT + 1 + indent % 4] += 1
    out[: MAX_INDENT + 5] /= len(lines)
    chars = np.frombuffer(text.encode("utf-8", "replace"), dtype=np.uint8)
    size = max(1, chars.shape[0])
    upper = (chars >= 65) & (chars <= 90)
    alnum = upper | ((chars >= 97) & (chars <= 122)) | ((chars >= 48) & (chars <= 57)) | (chars >= 128)
    space = (chars == 32) | (chars == 9) | (chars == 10) | (chars == 13)
    out[-3] = float(np.count_nonzero(~alnum & ~space)) / size
    out[-2] = float(np.count_nonzero(upper)) / size
    out[-1] = min(4.0, sum(len(line) for line in lines) / len(lines) / 80)
    return out


def text_features(text: str) -> np.ndarray:
    """The surface features of one text (``TEXT_DIM`` float32)."""
    return np.concatenate([ngram_features(text), layout_features(text)])


def features(embeddings: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """Rows of [embedding, surface features] for texts whose embeddings are given row by row."""
    if embeddings.shape[0] != len(texts):
        raise ValueError(f"{embeddings.shape[0]} embeddings for {len(texts)} texts")
    dim = embeddings.shape[1]
    out = np.empty((len(texts), dim + TEXT_DIM), dtype=np.float32)
    out[:, :dim] = embeddings
    for i, text in enumerate(texts):
        out[i, dim:] = text_features(text)
    return out


@dataclass(frozen=True, slots=True)
class DomainClassifier:
    """One-vs-rest linear scores over ``models`` from [embedding, surface features]."""

    models: tuple[str, ...]
    weights: np.ndarray  # (embedding dim + TEXT_DIM, len(models)) float32
    digest: str
    # Scores of recent (text, embedding) pairs: a repeated prompt (the cache-hit path) skips the
    # surface features, the costliest part of scoring. Owned by this instance, bounded.
    _recent: OrderedDict[tuple[str, bytes], np.ndarray] = field(default_factory=OrderedDict, compare=False,
                                                                repr=False)

    @property
    def embedding_dim(self) -> int:
        return int(self.weights.shape[0]) - TEXT_DIM

    def scores(self, embedding: np.ndarray, text: str) -> np.ndarray:
        """Raw scores, one per model in ``models`` order (about +1 for its class, -1 otherwise)."""
        if embedding.shape[0] != self.embedding_dim:
            raise ClassifierError(f"embedding has {embedding.shape[0]} dims, classifier expects {self.embedding_dim}")
        key = (text, embedding.tobytes())
        cached = self._recent.get(key)
        if cached is not None:
            self._recent.move_to_end(key)
            return cached
        dim = self.embedding_dim
        out = np.asarray(embedding @ self.weights[:dim] + text_features(text) @ self.weights[dim:])
        self._recent[key] = out
        if len(self._recent) > RECENT_SCORES:
            self._recent.popitem(last=False)
        return out

    def probabilities(self, embedding: np.ndarray, text: str, models: Sequence[str],
                      temperature: float) -> dict[str, float]:
        """Softmax of the scores of ``models`` (those this classifier knows) at ``temperature``."""
        index = {m: i for i, m in enumerate(self.models)}
        known = [m for m in models if m in index]
        if not known:
            return {}
        raw = self.scores(embedding, text)[[index[m] for m in known]].astype(np.float64)
        z = raw / max(temperature, 1e-6)
        e = np.exp(z - z.max())
        return dict(zip(known, (e / e.sum()).tolist(), strict=True))

    def to_bytes(self) -> bytes:
        return msgpack.packb({
            "v": FORMAT_VERSION, "models": list(self.models), "digest": self.digest,
            "rows": int(self.weights.shape[0]), "weights": np.ascontiguousarray(self.weights, np.float32).tobytes(),
        })

    @classmethod
    def from_bytes(cls, raw: bytes) -> DomainClassifier:
        try:
            data = msgpack.unpackb(raw)
            if data.get("v") != FORMAT_VERSION:
                raise ClassifierError(f"classifier format {data.get('v')!r}, expected {FORMAT_VERSION}")
            models = tuple(str(m) for m in data["models"])
            weights = np.frombuffer(data["weights"], dtype=np.float32).reshape(int(data["rows"]), len(models))
            return cls(models=models, weights=weights, digest=str(data["digest"]))
        except ClassifierError:
            raise
        except Exception as e:  # msgpack, key and shape errors alike: the blob is not a classifier
            raise ClassifierError(f"cannot decode the domain classifier: {e}") from e


def classifier_digest(profile_digests: Mapping[str, str], ridge: float) -> str:
    """What a classifier is trained from: the models, their profile digests and the ridge penalty."""
    key = repr((sorted(profile_digests.items()), float(ridge)))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def train(examples: Mapping[str, tuple[Sequence[str], np.ndarray]], ridge: float, digest: str) -> DomainClassifier:
    """Fit the classifier on each model's (texts, embeddings); at least two models are needed.

    Class-balanced ridge regression to ±1 targets: with D the per-row class weights, the weights are
    ``(Xᵀ D X + λI)⁻¹ Xᵀ D Y`` = ``Xᵀ (D X Xᵀ + λI)⁻¹ D Y``. The dual (rows × rows) is solved while there
    are fewer rows than features, the primal (features × features) beyond, so memory and time stay
    bounded however many models and exemplars the fleet has.
    """
    models = tuple(sorted(examples))
    if len(models) < 2:
        raise ValueError("a domain classifier needs at least two models")
    texts = [t for m in models for t in examples[m][0]]
    x = features(np.vstack([examples[m][1] for m in models]), texts)  # float32: 4 × 2,050 × 4,504 is 148 MB
    labels = np.concatenate([np.full(len(examples[m][0]), i) for i, m in enumerate(models)])
    counts = np.bincount(labels, minlength=len(models)).astype(np.float64)
    if (counts == 0).any():
        raise ValueError("every model needs at least one profile text")
    weight = (len(labels) / (len(models) * counts))[labels].astype(np.float32)
    targets = -np.ones((len(labels), len(models)), dtype=np.float32)
    targets[np.arange(len(labels)), labels] = 1.0
    weights = ridge_solve(x, weight, targets, ridge)
    return DomainClassifier(models=models, weights=weights.astype(np.float32), digest=digest)


def ridge_solve(x: np.ndarray, weight: np.ndarray, targets: np.ndarray, ridge: float,
                form: str = "auto") -> np.ndarray:
    """Weighted ridge weights, by the dual (``form="dual"``), the primal, or whichever system is smaller.

    float32 throughout: the ridge keeps either system well conditioned.
    """
    rows, dims = x.shape
    if form == "dual" or (form == "auto" and rows <= dims):
        gram = weight[:, None] * (x @ x.T)
        gram[np.diag_indices_from(gram)] += ridge
        return np.asarray(x.T @ np.linalg.solve(gram, weight[:, None] * targets))
    weighted = x * weight[:, None]
    cov = x.T @ weighted
    cov[np.diag_indices_from(cov)] += ridge
    return np.asarray(np.linalg.solve(cov, weighted.T @ targets))
