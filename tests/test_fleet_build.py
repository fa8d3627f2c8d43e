"""The built tiny fleet (from the session fixture `tiny_fleet`), export of a checkpoint, and a
scaled-down demo build (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers.fleet import PROFILES, build_fleet, load_fleet, recipe_hash
from workers.fleet.data import read_eval_set
from workers.fleet.greedy import GreedyOnnx
from workers.fleet.spec import Fleet, FleetError

REQUIRED_CARD = ("name", "path", "description", "examples", "prompt_template", "domains", "params", "memory_mb")
BUILD_TIMEOUT_S = 1200  # a hang guard: building is minutes on a busy 2-core machine


def _check_cards(fleet: Fleet, profile: str) -> None:
    recipe = PROFILES[profile]
    assert fleet.names == tuple(m.name for m in recipe.models)
    assert [c.name for c in fleet.models if c.baseline] == ["generalist"]
    for card in fleet.models:
        for key in REQUIRED_CARD:
            assert getattr(card, key) not in (None, "", (), 0), (card.name, key)
        assert 4 <= len(card.examples) <= 6 and "{prompt}" in card.prompt_template
        assert card.source.startswith(f"calm-builder:{card.name}@") and card.train_wall_s > 0
        assert card.train_steps > 0 and card.train_tokens > 0
        for domain in card.domains:
            assert f"{domain}.exact_match" in card.quality or f"{domain}.chrf" in card.quality
        model_dir = fleet.model_dir(card)
        assert (model_dir / "model.onnx").is_file() and (model_dir / "tokenizer.json").is_file()
    specialists = [c for c in fleet.models if not c.baseline]
    base = fleet.baseline()
    assert base is not None
    assert base.params > max(c.params for c in specialists)
    assert base.params * base.train_tokens >= sum(c.params * c.train_tokens for c in specialists)  # training compute
    assert set(fleet.eval_sets) == {d for c in fleet.models for d in c.domains}
    assert fleet.embedder_path is not None and (fleet.embedder_path / "tokenizer.json").is_file()


@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_tiny_fleet_cards_and_files(tiny_fleet: Path) -> None:
    fleet = load_fleet(tiny_fleet)
    _check_cards(fleet, "tiny")
    assert fleet.recipe_hash == recipe_hash("tiny") and fleet.profile == "tiny"
    for domain, path in fleet.eval_sets.items():
        items = read_eval_set(path)
        assert len(items) >= 200 and {i.domain for i in items} == {domain}


@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_every_card_ships_exemplars_from_its_training_split(tiny_fleet: Path) -> None:
    fleet = load_fleet(tiny_fleet)
    heldout = {item.prompt for path in fleet.eval_sets.values() for item in read_eval_set(path)}
    for card in fleet.models:
        exemplars = fleet.exemplars(card)
        assert len(exemplars) >= 32 and len(set(exemplars)) == len(exemplars), card.name
        assert not heldout & set(exemplars), f"{card.name}: an exemplar is a held-out eval prompt"
    arith = fleet.exemplars(fleet.model("arith"))
    assert all(p.endswith("=") and "+" in p for p in arith)


@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_exported_graph_has_kv_cache_io_and_answers(tiny_fleet: Path) -> None:
    import onnxruntime as ort

    fleet = load_fleet(tiny_fleet)
    card = fleet.model("arith")
    sess = ort.InferenceSession(str(fleet.model_dir(card) / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name for i in sess.get_inputs()}
    outputs = {o.name for o in sess.get_outputs()}
    assert {"input_ids", "past_key_values.0.key", "past_key_values.0.value"} <= inputs
    assert {"seqlens_k", "total_sequence_length"} <= inputs and "attention_mask" not in inputs  # a fused graph
    assert {"logits", "present.0.key", "present.0.value"} <= outputs
    model = GreedyOnnx(fleet.model_dir(card), eos_token=card.eos_token)
    assert model.generate("37+48=", max_new_tokens=6).strip().isdigit()


@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_specialists_share_the_pair_tokenizer(tiny_fleet: Path) -> None:
    fleet = load_fleet(tiny_fleet)
    texts = {(fleet.model_dir(c) / "tokenizer.json").read_text() for c in fleet.models}
    assert len(texts) == 1


@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_recorded_quality_is_reproduced_by_the_exported_model(tiny_fleet: Path) -> None:
    from workers.fleet.evaluate import evaluate_model

    fleet = load_fleet(tiny_fleet)
    card = fleet.model("sort")
    items = {"sorting": read_eval_set(fleet.eval_sets["sorting"])}
    assert evaluate_model(fleet.model_dir(card), items, card.eos_token, threads=1) == dict(card.quality)


@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_another_exemplar_count_is_written_in_place_without_retraining(tiny_fleet: Path, tmp_path: Path) -> None:
    import dataclasses
    import shutil

    from workers.fleet.build import refresh_exemplars

    copy = tmp_path / "fleet"
    shutil.copytree(tiny_fleet, copy)
    recipe = PROFILES["tiny"]
    more = dataclasses.replace(recipe, exemplars_per_model=2 * recipe.exemplars_per_model)
    assert recipe_hash(more) == recipe_hash(recipe), "exemplars are derived data, not part of the recipe hash"
    onnx = copy / "models" / "arith" / "model.onnx"
    before = onnx.stat().st_mtime_ns
    refresh_exemplars(copy, recipe)  # the count the fleet was built with: nothing to do
    assert len(load_fleet(copy).exemplars(load_fleet(copy).model("arith"))) == recipe.exemplars_per_model
    refresh_exemplars(copy, more)
    fleet = load_fleet(copy)
    arith = fleet.exemplars(fleet.model("arith"))
    assert len(arith) == more.exemplars_per_model and len(set(arith)) == len(arith)
    assert onnx.stat().st_mtime_ns == before


@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_cache_hit_and_out_copy_import_no_torch(tiny_fleet: Path, tmp_path: Path) -> None:
    cache = tiny_fleet.parent.parent
    if tiny_fleet.parent.name != "fleets":
        pytest.skip("CALM_TEST_FLEET points outside a build cache")
    out = tmp_path / "copy"
    code = (
        "import sys, pathlib; from workers.fleet import build_fleet;"
        f"p = build_fleet('tiny', pathlib.Path({str(cache)!r}), progress=False);"
        f"q = build_fleet('tiny', pathlib.Path({str(cache)!r}), out=pathlib.Path({str(out)!r}), progress=False);"
        "print(p); print(q); sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == [str(tiny_fleet), str(out.resolve())]
    assert load_fleet(out).recipe_hash == recipe_hash("tiny")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(FleetError, match="not this fleet"):
        build_fleet("tiny", cache, out=tmp_path / "busy", progress=False)


@pytest.mark.timeout(300)
def test_export_checkpoint_to_fleet(tmp_path: Path) -> None:
    from workers.fleet import export_checkpoint_to_fleet
    from workers.fleet.recipes import DomainPlan, ModelRecipe
    from workers.fleet.tokenizer import EOS, train_tokenizer
    from workers.fleet.train import build_model, save_checkpoint

    tok = train_tokenizer(["1+2=3", "sort 3 1 2 = 1 2 3"] * 50, 300)
    recipe = ModelRecipe(
        name="x",
        description="",
        examples=(),
        plan=(DomainPlan("arithmetic", 1, 1, 8),),
        hidden=32,
        layers=1,
        heads=2,
        intermediate=64,
        lr=1e-3,
        seed=0,
        max_positions=64,
    )
    model = build_model(recipe, tok.get_vocab_size(), tok.token_to_id(EOS))
    save_checkpoint(model, tok, tmp_path / "ckpt", 64)
    fleet_dir = tmp_path / "fleet"
    card = export_checkpoint_to_fleet(
        tmp_path / "ckpt", fleet_dir, "mine", "a random tiny model", ["1+2=", "2+2="], int8=True
    )
    assert card.name == "mine" and card.params == sum(p.numel() for p in model.parameters())
    fleet = load_fleet(fleet_dir)
    assert fleet.model("mine") == card and card.eos_token == EOS and card.memory_mb >= 1
    text = GreedyOnnx(fleet.model_dir(card)).generate("1+2=", max_new_tokens=3)
    assert isinstance(text, str)
    with pytest.raises(FleetError, match="already has a model named 'mine'"):
        export_checkpoint_to_fleet(tmp_path / "ckpt", fleet_dir, "mine", "again", ["1+2="])


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_demo_recipe_builds_with_reduced_steps(tmp_path: Path) -> None:
    path = build_fleet("demo", tmp_path / "cache", progress=False, steps_scale=0.02)
    fleet = load_fleet(path)
    _check_cards(fleet, "demo")
    assert fleet.recipe_hash != recipe_hash("demo")
    for domain in ("code", "prose"):
        rows = [json.loads(line) for line in fleet.eval_sets[domain].read_text().splitlines()]
        assert len(rows) >= 50 and all(set(r) == {"prompt", "reference", "domain"} for r in rows)
        assert f"{domain}.chrf" in fleet.model(domain).quality
