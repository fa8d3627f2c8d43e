"""The production engine on the tiny fleet's trained arithmetic specialist, on held-out problems."""

from __future__ import annotations

import json
from pathlib import Path

from workers.engine import OnnxCausalLM
from workers.fleet.spec import load_fleet

HELD_OUT = 150
MIN_EXACT_MATCH = 0.80  # the recipe measures 0.853 on all 300 held-out problems; greedy decoding is deterministic


def test_arithmetic_specialist_answers_held_out_problems(tiny_fleet: Path) -> None:
    fleet = load_fleet(tiny_fleet)
    card = fleet.model("arith")
    engine = OnnxCausalLM.load(fleet.model_dir(card), name=card.name, eos_token=card.eos_token)
    rows = [json.loads(line) for line in fleet.eval_sets["arithmetic"].read_text().splitlines() if line.strip()]
    rows = rows[:HELD_OUT]
    correct = sum(engine.generate(card.render(r["prompt"]), max_new_tokens=6).text.strip() == r["reference"]
                  for r in rows)
    assert correct / len(rows) >= MIN_EXACT_MATCH, f"{correct}/{len(rows)} held-out problems right"
    generalist = fleet.baseline()
    assert generalist is not None and not card.baseline
