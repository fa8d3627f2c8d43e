"""``calm fleet export``: a local checkpoint enters a fleet and a worker's engine reproduces its greedy output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_exported_checkpoint_matches_its_own_greedy_output(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from workers.engine import OnnxCausalLM
    from workers.fleet.recipes import DomainPlan, ModelRecipe
    from workers.fleet.spec import load_fleet
    from workers.fleet.tokenizer import EOS, train_tokenizer
    from workers.fleet.train import build_model, save_checkpoint

    tok = train_tokenizer(["12+7=19", "sort 3 1 2 = 1 2 3", "def f(x):\n    return x"] * 40, 300)
    recipe = ModelRecipe(name="x", description="", examples=(), plan=(DomainPlan("arithmetic", 1, 1, 8),),
                         hidden=32, layers=2, heads=2, intermediate=64, lr=1e-3, seed=3, max_positions=64)
    model = build_model(recipe, tok.get_vocab_size(), tok.token_to_id(EOS))
    save_checkpoint(model, tok, tmp_path / "ckpt", 64)
    fleet_dir = tmp_path / "fleet"
    env = {**os.environ, "CALM_FLEET": str(fleet_dir)}
    proc = subprocess.run(
        [sys.executable, "-m", "calm", "fleet", "export", str(tmp_path / "ckpt"), "--name", "mine",
         "--description", "a locally trained test model", "--examples", "12+7=", "sort 3 1 2 ="],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(fleet_dir)
    fleet = load_fleet(fleet_dir)
    card = fleet.model("mine")
    assert card.description == "a locally trained test model" and card.examples == ("12+7=", "sort 3 1 2 =")
    engine = OnnxCausalLM.load(fleet.model_dir(card), name="mine", eos_token=card.eos_token)
    model.eval()
    for prompt in ("12+7=", "sort 3 1 2 =", "def f(x):"):
        ids = tok.encode(prompt).ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                 pad_token_id=tok.token_to_id(EOS))
        expected = out[0, len(ids):].tolist()
        assert engine.generate_ids(ids, max_new_tokens=8)[:8] == expected[:8], prompt
