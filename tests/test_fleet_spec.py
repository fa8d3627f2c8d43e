"""fleet.toml: model cards, round trip and the errors a user sees (fast; no torch)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from workers.fleet.spec import (
    FLEET_FILE,
    Fleet,
    FleetError,
    ModelCard,
    add_model_card,
    load_fleet,
    write_fleet,
)


def _model_dir(root: Path, name: str) -> str:
    d = root / "models" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.onnx").write_bytes(b"onnx")
    return f"models/{name}"


def _card(root: Path, name: str, **kw: object) -> ModelCard:
    return ModelCard(
        name=name,
        path=_model_dir(root, name),
        description=f"{name} in plain words",
        examples=("1+1=", "2+2="),
        **kw,  # type: ignore[arg-type]
    )


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    (tmp_path / "embedder").mkdir()
    (tmp_path / "embedder" / "model.onnx").write_bytes(b"x")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "arithmetic.jsonl").write_text("{}\n")
    card = _card(
        tmp_path,
        "arith",
        domains=("arithmetic",),
        params=123,
        memory_mb=4,
        source="calm-builder:arith@abc",
        train_steps=10,
        train_tokens=640,
        train_wall_s=1.5,
        quality={"exact_match": 0.9},
    )
    base = _card(tmp_path, "generalist", baseline=True, quality={"arithmetic.exact_match": 0.5})
    fleet = Fleet(
        root=tmp_path,
        name="t",
        profile="tiny",
        recipe_hash="ff" * 32,
        embedder_path=tmp_path / "embedder",
        models=(card, base),
        eval_sets={"arithmetic": tmp_path / "eval" / "arithmetic.jsonl"},
    )
    write_fleet(fleet)
    loaded = load_fleet(tmp_path)
    assert loaded.models == (card, base)
    assert loaded.profile == "tiny" and loaded.recipe_hash == "ff" * 32
    assert loaded.embedder_path == (tmp_path / "embedder").resolve()
    assert loaded.eval_sets == {"arithmetic": (tmp_path / "eval" / "arithmetic.jsonl").resolve()}
    assert loaded.model("arith") == card
    assert loaded.baseline() == base
    assert loaded.model_dir(card) == (tmp_path / "models" / "arith").resolve()
    with pytest.raises(KeyError):
        loaded.model("nope")


def test_minimal_user_written_fleet_loads_with_defaults(tmp_path: Path) -> None:
    _model_dir(tmp_path, "mine")
    (tmp_path / FLEET_FILE).write_text(
        '[[models]]\nname = "mine"\npath = "models/mine"\ndescription = "my model"\n'
        'examples = ["hello"]\nprompt_template = "Q: {prompt}\\nA:"\n'
    )
    fleet = load_fleet(tmp_path)
    card = fleet.model("mine")
    assert card.domains == () and card.params == 0 and not card.baseline
    assert card.eos_token == "<|endoftext|>"
    assert card.render("2+2") == "Q: 2+2\nA:"
    assert fleet.baseline() is None and fleet.embedder_path is None and fleet.name == tmp_path.name


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[[models]\nname = 1", "not valid TOML"),
        ("[fleet]\nname = 'x'\n", "lists no models"),
        ('[[models]]\nname = "a"\npath = "models/a"\n', "lacks required field(s) description"),
        (
            '[[models]]\nname = "a"\npath = "models/a"\ndescription = "d"\nexamples = ["x"]\n'
            'prompt_template = "{prompt}"\ncolour = "red"\n',
            "unknown field(s) colour",
        ),
        (
            '[[models]]\nname = "a"\npath = "models/a"\ndescription = "d"\nexamples = "x"\n'
            'prompt_template = "{prompt}"\n',
            "examples must be a list",
        ),
        (
            '[[models]]\nname = "a"\npath = "models/a"\ndescription = "d"\nexamples = ["x"]\n'
            'prompt_template = "no placeholder"\n',
            "lacks '{prompt}'",
        ),
    ],
)
def test_malformed_fleet_toml_names_file_and_problem(tmp_path: Path, text: str, needle: str) -> None:
    _model_dir(tmp_path, "a")
    (tmp_path / FLEET_FILE).write_text(text)
    with pytest.raises(FleetError) as err:
        load_fleet(tmp_path)
    assert needle in str(err.value)
    assert str(tmp_path / FLEET_FILE) in str(err.value)


def test_missing_directory_file_and_model(tmp_path: Path) -> None:
    with pytest.raises(FleetError, match="does not exist"):
        load_fleet(tmp_path / "absent")
    with pytest.raises(FleetError, match="missing"):
        load_fleet(tmp_path)
    entry = (
        '[[models]]\nname = "a"\npath = "models/a"\ndescription = "d"\nexamples = []\nprompt_template = "{prompt}"\n'
    )
    (tmp_path / FLEET_FILE).write_text(entry)
    with pytest.raises(FleetError, match=r"model 'a': .*model.onnx is missing"):
        load_fleet(tmp_path)
    _model_dir(tmp_path, "a")
    (tmp_path / FLEET_FILE).write_text(entry + entry)
    with pytest.raises(FleetError, match="duplicate model name 'a'"):
        load_fleet(tmp_path)


def test_add_model_card_creates_and_refuses_duplicates(tmp_path: Path) -> None:
    fleet = add_model_card(tmp_path, _card(tmp_path, "a"))
    assert fleet.names == ("a",)
    fleet = add_model_card(tmp_path, _card(tmp_path, "b"))
    assert fleet.names == ("a", "b")
    with pytest.raises(FleetError, match="already has a model named 'a'"):
        add_model_card(tmp_path, _card(tmp_path, "a"))
    replaced = add_model_card(tmp_path, _card(tmp_path, "a", params=7), replace_existing=True)
    assert replaced.model("a").params == 7


def test_importing_the_package_does_not_import_torch() -> None:
    code = (
        "import sys, workers.fleet as f; f.recipe_hash('tiny'); f.PROFILES['demo'];"
        "import workers.fleet.quality, workers.fleet.greedy;"
        "bad = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_exemplars_are_read_from_the_card_file_and_errors_name_it(tmp_path: Path) -> None:
    _model_dir(tmp_path, "a")
    card = replace(_card(tmp_path, "a"), exemplars="models/a/exemplars.jsonl")
    fleet = add_model_card(tmp_path, card)
    with pytest.raises(FleetError, match=r"exemplars.jsonl: cannot read exemplars of model 'a'"):
        fleet.exemplars(card)
    path = tmp_path / "models" / "a" / "exemplars.jsonl"
    path.write_text('{"prompt": "1+2="}\n\n{"prompt": "3+4=", "domain": "arithmetic"}\n')
    assert load_fleet(tmp_path).exemplars(card) == ("1+2=", "3+4=")
    assert fleet.exemplars(card, limit=1) == ("1+2=",)
    assert fleet.exemplars(replace(card, exemplars="")) == ()
    path.write_text('{"prompt": "1+2="}\n{"text": 3}\n')
    with pytest.raises(FleetError, match=r"exemplars.jsonl:2: expected"):
        fleet.exemplars(card)
    path.write_bytes(b"\xff\xfe not json")
    with pytest.raises(FleetError, match="are not JSON lines"):
        fleet.exemplars(card)
