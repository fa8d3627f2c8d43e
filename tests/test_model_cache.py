"""Built models are cached by what they depend on: a recipe that changes one model retrains only it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from workers.fleet import PROFILES, load_fleet, recipe_hash
from workers.fleet.jobs import ModelOutcome
from workers.fleet.model_cache import OUTCOME_FILE, ModelCache, model_key

OUTCOME = ModelOutcome(name="m", params=10, train_steps=2, train_tokens=30, train_wall_s=1.5, final_loss=0.5,
                       export_s=0.1, eval_s=0.2, quality={"arithmetic.exact_match": 0.5}, cpu_s=2.0)


def _model_dir(path: Path, content: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "model.onnx").write_bytes(content)
    (path / "config.json").write_text("{}")
    return path


def test_a_stored_model_is_restored_with_its_build_facts(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache")
    assert cache.restore("m", "k" * 64, tmp_path / "nothing") is None
    cache.store("m", "k" * 64, _model_dir(tmp_path / "built", b"weights"), OUTCOME)
    cache.store("m", "k" * 64, _model_dir(tmp_path / "again", b"other"), OUTCOME)  # kept: the first stays
    assert cache.restore("m", "k" * 64, tmp_path / "fleet" / "m") == OUTCOME
    assert (tmp_path / "fleet" / "m" / "model.onnx").read_bytes() == b"weights"
    assert not (tmp_path / "fleet" / "m" / OUTCOME_FILE).exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"m-{'k' * 16}"]  # no scratch left behind


@pytest.mark.parametrize("damage", ["{not json", json.dumps({"name": "m"}), json.dumps([1, 2])])
def test_a_damaged_entry_is_a_miss(tmp_path: Path, damage: str) -> None:
    cache = ModelCache(tmp_path / "cache")
    cache.store("m", "k" * 64, _model_dir(tmp_path / "built", b"weights"), OUTCOME)
    (cache.entry("m", "k" * 64) / OUTCOME_FILE).write_text(damage)
    assert cache.restore("m", "k" * 64, tmp_path / "fleet" / "m") is None
    cache.store("m", "k" * 64, _model_dir(tmp_path / "rebuilt", b"new"), OUTCOME)  # the rebuild replaces it
    assert cache.restore("m", "k" * 64, tmp_path / "fleet2" / "m") == OUTCOME
    assert (tmp_path / "fleet2" / "m" / "model.onnx").read_bytes() == b"new"


def test_the_key_follows_what_is_trained_not_the_card_text() -> None:
    recipe = PROFILES["tiny"]
    arith = recipe.models[0]
    base = model_key(recipe, arith)
    assert model_key(recipe, dataclasses.replace(arith, description="another text", examples=("1+1=",))) == base
    assert model_key(recipe, dataclasses.replace(arith, seed=arith.seed + 1)) != base
    assert model_key(recipe, dataclasses.replace(arith, lr=arith.lr / 2)) != base
    generalist = recipe.models[-1]  # its tokenizer is the fleet's: the fleet's vocabulary size is in its key
    assert model_key(dataclasses.replace(recipe, vocab_size=recipe.vocab_size + 1), generalist) != \
        model_key(recipe, generalist)
    assert model_key(dataclasses.replace(recipe, vocab_size=recipe.vocab_size + 1), arith) == base  # arith's is own
    other_data = dataclasses.replace(recipe.data, eval_items_pairs=recipe.data.eval_items_pairs + 1)
    assert model_key(dataclasses.replace(recipe, data=other_data), arith) != base


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_changed_model_is_the_only_one_retrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    from workers.fleet import build as build_module

    base = dataclasses.replace(PROFILES["tiny"].scaled(0.01), with_embedder=False)
    trained: list[set[str]] = []
    real = build_module.run_jobs

    def spy(jobs: list[Any], *args: Any, **kwargs: Any) -> Any:
        trained.append({job.recipe.name for job in jobs})
        return real(jobs, *args, **kwargs)

    monkeypatch.setattr(build_module, "run_jobs", spy)
    cache = ModelCache(tmp_path / "models")
    build_module._build_into(base, tmp_path / "a", progress=False, workers=1, models=cache)
    changed = dataclasses.replace(base, models=tuple(
        dataclasses.replace(m, seed=m.seed + 1) if m.name == "sort"
        else dataclasses.replace(m, description="adds two numbers (new card text)") if m.name == "arith" else m
        for m in base.models))
    build_module._build_into(changed, tmp_path / "b", progress=False, workers=1, models=cache)
    assert trained == [{"arith", "sort", "generalist"}, {"sort"}]
    a, b = load_fleet(tmp_path / "a"), load_fleet(tmp_path / "b")
    assert b.recipe_hash == recipe_hash(changed) != a.recipe_hash
    for name in ("arith", "generalist"):  # reused: the same files and build facts
        assert (a.model_dir(a.model(name)) / "model.onnx").read_bytes() == \
            (b.model_dir(b.model(name)) / "model.onnx").read_bytes()
        assert a.model(name).quality == b.model(name).quality
        assert a.model(name).train_wall_s == b.model(name).train_wall_s
        assert (b.model_dir(b.model(name)) / "exemplars.jsonl").is_file()
    assert b.model("arith").description == "adds two numbers (new card text)"
    assert (a.model_dir(a.model("sort")) / "model.onnx").read_bytes() != \
        (b.model_dir(b.model("sort")) / "model.onnx").read_bytes()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_graph_restored_from_the_cache_is_brought_to_the_current_fusion_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    onnx = pytest.importorskip("onnx")
    from workers.fleet import build as build_module
    from workers.fleet import fuse as fuse_module

    recipe = dataclasses.replace(PROFILES["tiny"].scaled(0.01), with_embedder=False)
    cache = ModelCache(tmp_path / "models")
    with monkeypatch.context() as older_builder:  # one that did not fuse: its cached graphs are as exported
        older_builder.setattr(fuse_module, "fuse_decoder", lambda *args, **kwargs: None)
        older_builder.setattr(build_module, "fuse_decoder", lambda *args, **kwargs: None)
        build_module._build_into(recipe, tmp_path / "a", progress=False, workers=1, models=cache)
    floats = [m.name for m in recipe.models if not m.int8]
    assert floats and all(fuse_module.fused_version(tmp_path / "a" / "models" / n / "model.onnx") is None
                          for n in floats)

    build_module._build_into(recipe, tmp_path / "b", progress=False, workers=1, models=cache)
    for name in floats:  # restored, then rewritten before the fleet was published
        assert fuse_module.fused_version(tmp_path / "b" / "models" / name / "model.onnx") == fuse_module.FUSED_VERSION
        graph = onnx.load(str(tmp_path / "b" / "models" / name / "model.onnx")).graph
        assert "seqlens_k" in {i.name for i in graph.input}  # the current GroupQueryAttention graph
    assert (tmp_path / "b" / build_module.GRAPHS_STAMP).read_text() == fuse_module.FUSED_VERSION
