"""The domain classifier: surface features, training, its blend with cosine fit, storage and decoding."""

from __future__ import annotations

import numpy as np
import pytest

from broker.config import PlannerSettings
from calm_actors.domain_classifier import (
    TEXT_DIM,
    ClassifierError,
    DomainClassifier,
    classifier_digest,
    layout_features,
    ngram_features,
    ridge_solve,
    text_features,
    train,
)
from calm_actors.scoring import blended_fits

CODE = [
    "def add(a, b):\n    return a + b\n",
    "for item in items:\n    if item.ok:\n        yield item\n",
    "class Stack:\n    def __init__(self):\n        self._items = []\n",
    "    with open(path) as fh:\n        data = fh.read()\n",
    "import os\nimport sys\n\nx = os.path.join(a, b)\n",
    "    try:\n        value = int(text)\n    except ValueError:\n        value = 0\n",
]
PROSE = [
    "   The statement evaluates each expression in turn and\n   assigns the result to the target list.\n",
    "   A class definition defines a class object, which is then\n   bound to a name in the local namespace.\n",
    "   Names refer to objects. Names are introduced by name binding\n   operations such as assignment.\n",
    "   The with statement wraps the execution of a block with methods\n   defined by a context manager.\n",
    "   Exceptions are a means of breaking out of the normal flow of\n   control of a code block.\n",
    "   Objects are Python's abstraction for data. All data in a\n   program is represented by objects.\n",
]


def fake_embeddings(texts: list[str], dim: int = 8) -> np.ndarray:
    """Embeddings that carry no domain signal at all: the surface features must do the work."""
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(len(texts), dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_surface_features_are_normalised_and_see_layout() -> None:
    v = ngram_features("def f(x):\n    return x\n")
    assert v.shape == (TEXT_DIM - layout_features("").shape[0],)
    assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
    assert not ngram_features("").any()
    code, prose = layout_features(CODE[2]), layout_features(PROSE[0])
    assert code[4] > 0 and code[0] > 0  # lines indented by 4 and by 0
    assert prose[3] == pytest.approx(1.0)  # every line indented by 3
    assert text_features("x").shape == (TEXT_DIM,)


def test_training_separates_domains_the_embeddings_cannot() -> None:
    examples = {"code": (CODE[:4], fake_embeddings(CODE[:4])), "prose": (PROSE[:4], fake_embeddings(PROSE[:4]))}
    clf = train(examples, ridge=0.05, digest="d1")
    assert clf.models == ("code", "prose")
    for text in CODE[4:]:
        p = clf.probabilities(fake_embeddings([text])[0], text, ["code", "prose"], temperature=0.1)
        assert p["code"] > p["prose"], text
    for text in PROSE[4:]:
        p = clf.probabilities(fake_embeddings([text])[0], text, ["code", "prose"], temperature=0.1)
        assert p["prose"] > p["code"], text
    assert sum(p.values()) == pytest.approx(1.0)
    assert clf.probabilities(fake_embeddings(["x"])[0], "x", ["unknown"], 0.1) == {}


def test_training_needs_two_models_with_texts() -> None:
    with pytest.raises(ValueError):
        train({"code": (CODE, fake_embeddings(CODE))}, ridge=0.05, digest="d")
    with pytest.raises(ValueError):
        train({"code": (CODE, fake_embeddings(CODE)), "prose": ([], np.zeros((0, 8), np.float32))}, 0.05, "d")


def test_round_trip_and_corrupt_blobs() -> None:
    examples = {"code": (CODE, fake_embeddings(CODE)), "prose": (PROSE, fake_embeddings(PROSE))}
    clf = train(examples, ridge=0.05, digest="abc")
    back = DomainClassifier.from_bytes(clf.to_bytes())
    assert back.models == clf.models and back.digest == "abc"
    np.testing.assert_array_equal(back.weights, clf.weights)
    with pytest.raises(ClassifierError):
        DomainClassifier.from_bytes(b"not msgpack at all \xff")
    with pytest.raises(ClassifierError):
        clf.scores(np.zeros(3, np.float32), "x")  # wrong embedding size


def test_digest_depends_on_models_profiles_and_ridge() -> None:
    assert classifier_digest({"a": "1", "b": "2"}, 0.5) == classifier_digest({"b": "2", "a": "1"}, 0.5)
    assert classifier_digest({"a": "1", "b": "2"}, 0.5) != classifier_digest({"a": "1", "b": "3"}, 0.5)
    assert classifier_digest({"a": "1", "b": "2"}, 0.5) != classifier_digest({"a": "1", "b": "2"}, 1.0)


def test_blend_moves_specialists_and_leaves_baselines_alone() -> None:
    examples = {"code": (CODE, fake_embeddings(CODE)), "prose": (PROSE, fake_embeddings(PROSE))}
    clf = train(examples, ridge=0.05, digest="d")
    text = "    while queue:\n        node = queue.pop()\n"
    emb = fake_embeddings([text])[0]
    names, baseline = ["code", "prose", "generalist"], [False, False, True]
    cosines = [0.40, 0.42, 0.41]  # cosine alone slightly prefers prose
    settings = PlannerSettings()
    plain = blended_fits(names, baseline, cosines, emb, text, None, settings)
    sharp = blended_fits(names, baseline, cosines, emb, text, clf, settings)
    assert plain[1] > plain[0] and sharp[0] > sharp[1]
    assert sharp[2] == pytest.approx(plain[2])  # the baseline keeps its cosine share
    assert sum(sharp) == pytest.approx(sum(plain))
    off = blended_fits(names, baseline, cosines, emb, text, clf, PlannerSettings(classifier_weight=0))
    assert off == plain
    # a specialist the classifier does not know: cosine shares only
    unknown = blended_fits(["code", "math"], [False, False], [0.4, 0.5], emb, text, clf, settings)
    assert unknown == blended_fits(["code", "math"], [False, False], [0.4, 0.5], emb, text, None, settings)


def test_primal_and_dual_solutions_agree() -> None:
    """More rows than features switches to the primal system: the same weights, a smaller system."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 12)).astype(np.float32)
    weight = rng.uniform(0.5, 2.0, size=60).astype(np.float32)
    targets = np.where(rng.random((60, 3)) < 0.3, 1.0, -1.0).astype(np.float32)
    dual = ridge_solve(x, weight, targets, 0.5, form="dual")
    primal = ridge_solve(x, weight, targets, 0.5, form="primal")
    np.testing.assert_allclose(primal, dual, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(ridge_solve(x, weight, targets, 0.5), primal)  # auto: rows > features
    np.testing.assert_allclose(ridge_solve(x[:8], weight[:8], targets[:8], 0.5),
                               ridge_solve(x[:8], weight[:8], targets[:8], 0.5, form="dual"))


def test_repeated_prompts_reuse_their_scores_and_nothing_else_does() -> None:
    examples = {"code": (CODE, fake_embeddings(CODE)), "prose": (PROSE, fake_embeddings(PROSE))}
    clf = train(examples, ridge=0.5, digest="d")
    emb = fake_embeddings([CODE[0]])[0]
    first = clf.scores(emb, CODE[0])
    np.testing.assert_array_equal(clf.scores(emb, CODE[0]), first)
    other = clf.scores(-emb, CODE[0])  # same text, another embedding: computed afresh
    dim = clf.embedding_dim
    np.testing.assert_allclose(other, -emb @ clf.weights[:dim] + text_features(CODE[0]) @ clf.weights[dim:],
                               rtol=1e-5)
    assert not np.allclose(other, first)
