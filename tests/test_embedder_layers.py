"""A shallower router embedder: the first N of MiniLM's layers, exported and quantised like the full one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from workers.fleet.export import _first_layers
from workers.fleet.recipes import FleetRecipe, canonical_json


def _source(tmp_path: Path, layers: int = 6) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"num_hidden_layers": layers, "hidden_size": 384}))
    (source / "model.safetensors").write_bytes(b"weights")
    return source


def test_a_view_of_the_source_keeps_the_first_layers(tmp_path: Path) -> None:
    source = _source(tmp_path)
    with _first_layers(source, 2) as view:
        assert view != source
        assert json.loads((view / "config.json").read_text()) == {"num_hidden_layers": 2, "hidden_size": 384}
        assert (view / "model.safetensors").resolve() == (source / "model.safetensors").resolve()
    assert not view.exists()  # the view is temporary
    assert json.loads((source / "config.json").read_text())["num_hidden_layers"] == 6  # the source is untouched


@pytest.mark.parametrize("layers", [0, 6, 9])
def test_all_layers_export_the_source_itself(tmp_path: Path, layers: int) -> None:
    source = _source(tmp_path)
    with _first_layers(source, layers) as view:
        assert view == source


def test_negative_layers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layers"), _first_layers(_source(tmp_path), -1):
        pass


def test_the_recipe_hash_names_a_shallower_embedder_only() -> None:
    recipe = FleetRecipe(profile="x", models=(), vocab_size=64)
    assert "embedder_layers" not in canonical_json(recipe)  # fleets built before the field keep their hash
    assert '"embedder_layers":2' in canonical_json(FleetRecipe(profile="x", models=(), vocab_size=64,
                                                               embedder_layers=2))


@pytest.mark.slow
def test_a_two_layer_embedder_exports_and_embeds(tmp_path: Path) -> None:
    pytest.importorskip("optimum.exporters.onnx")
    import onnx

    from calm_actors.embedder import SentenceEmbedder
    from workers.fleet.export import export_embedder

    export_embedder(tmp_path, int8=True, layers=2)
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    layers = {n.name.split("/")[2] for n in graph.node if n.name.startswith("/encoder/layer.")}
    assert layers == {"layer.0", "layer.1"}
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 2
    vectors = SentenceEmbedder(tmp_path).embed(["37+48=", "12+7=", "def area(r):\n    return 3.14 * r * r"])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]  # two sums are nearer each other than to code
