"""The router embeds a prompt's opening only (``ingress.embed_tokens``), and says when it cut a prompt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from broker.config import IngressSettings, load_settings
from broker.errors import ConfigError
from calm_actors.embedder import MAX_TOKENS, RUN_BATCH, EmbedderError, SentenceEmbedder, embedder_dir

OPENING = "def area(radius):\n    return 3.14159 * radius * radius"
LONG_A = OPENING + "\n\ndef perimeter(radius):\n    return 2 * 3.14159 * radius"
LONG_B = OPENING + "\n\nclass Shelf:\n    books = []\n    owner = 'the library'"


@pytest.fixture(scope="module")
def fleet_embedder_dir(tiny_fleet: Path) -> Path:
    return embedder_dir(tiny_fleet)


def test_prompts_are_embedded_by_their_first_tokens(fleet_embedder_dir: Path) -> None:
    cut = SentenceEmbedder(fleet_embedder_dir, max_tokens=12)
    full = SentenceEmbedder(fleet_embedder_dir)
    a, b = cut.embed([LONG_A, LONG_B])
    assert float(a @ b) > 0.999  # one opening: one vector
    a, b = full.embed([LONG_A, LONG_B])
    assert float(a @ b) < 0.98  # the whole prompts differ


def test_embed_marked_says_which_texts_were_cut(fleet_embedder_dir: Path) -> None:
    embedder = SentenceEmbedder(fleet_embedder_dir, max_tokens=8)
    vectors, whole = embedder.embed_marked(["12+7=", LONG_A, "one two three four five six"])
    assert whole.tolist() == [True, False, True]  # six words, [CLS] and [SEP]: exactly eight tokens
    np.testing.assert_allclose(vectors, embedder.embed(["12+7=", LONG_A, "one two three four five six"]), atol=1e-6)
    many = ["7+7=", LONG_A] * (RUN_BATCH // 2 + 3)  # more than one model run: the marks stay aligned
    vectors, whole = embedder.embed_marked(many)
    assert vectors.shape == (len(many), embedder.dim) and whole.tolist() == [True, False] * (RUN_BATCH // 2 + 3)
    empty, none = embedder.embed_marked([])
    assert empty.shape == (0, embedder.dim) and none.shape == (0,)


def test_the_cut_is_part_of_the_embedders_identity(fleet_embedder_dir: Path) -> None:
    default = SentenceEmbedder(fleet_embedder_dir, max_tokens=MAX_TOKENS)
    cut = SentenceEmbedder(fleet_embedder_dir, max_tokens=16)
    assert ":" not in default.identity  # profiles cached before the setting keep their key
    assert cut.identity == f"{default.identity}:16"  # cut profiles never mix with whole ones on disk


@pytest.mark.parametrize("tokens", [0, 2, 513])
def test_a_cut_outside_what_the_model_takes_is_refused(fleet_embedder_dir: Path, tokens: int) -> None:
    with pytest.raises(EmbedderError, match="max_tokens"):
        SentenceEmbedder(fleet_embedder_dir, max_tokens=tokens)
    with pytest.raises(ConfigError, match=r"ingress\.embed_tokens"):
        load_settings(env={"CALM_INGRESS_EMBED_TOKENS": str(tokens)})


def test_the_setting_reaches_the_config() -> None:
    assert IngressSettings().embed_tokens == 16
    assert load_settings(env={"CALM_INGRESS_EMBED_TOKENS": "48"}).ingress.embed_tokens == 48
