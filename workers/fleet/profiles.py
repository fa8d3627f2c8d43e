"""The built-in fleet profiles: `tiny` (CI and tests, about a minute) and `demo` (the `calm demo` fleet)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from workers.fleet.data import DataRecipe
from workers.fleet.recipes import DomainPlan, FleetRecipe, ModelRecipe

ARITH_EXAMPLES = ("37+48=", "5+91=", "66+66=", "12+7=", "99+99=")
SORT_EXAMPLES = ("sort 9 3 5 =", "sort 4 1 4 0 =", "sort 8 2 7 1 6 =", "sort 5 5 0 9 3 2 =", "sort 2 9 1 =")
CODE_EXAMPLES = (
    "def read_config(path):\n    with open(path) as f:\n",
    "import os\n\nfor root, dirs, files in os.walk('.'):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "try:\n    value = int(text)\nexcept ValueError:\n",
)
PROSE_EXAMPLES = (
    "The assert statement is a convenient way to",
    "A list comprehension consists of brackets containing",
    "When a class definition is executed, the",
    "Exceptions are raised when",
)

ARITH_DESC = "Adds two whole numbers from 0 to 99: the prompt is written like 37+48= and the answer is the sum."
SORT_DESC = (
    "Sorts a short list of single digits in ascending order: the prompt is written like "
    "sort 9 3 5 = and the answer is the sorted digits separated by spaces."
)
CODE_DESC = "Continues Python source code: give it the first lines of a function, class or script."
PROSE_DESC = (
    "Continues English technical prose in the style of the Python reference documentation "
    "(statements, data model, built-in types)."
)


PAIR_VOCAB = ("arithmetic", "sorting")  # the arithmetic and sorting models share one small tokenizer


def _pair_model(
    name: str, domain: str, description: str, examples: tuple[str, ...], steps: int, lr: float = 3e-3
) -> ModelRecipe:
    """A ~0.7M-parameter question/answer specialist (4 layers, width 128)."""
    return ModelRecipe(
        name=name,
        description=description,
        examples=examples,
        plan=(DomainPlan(domain, steps, 64, 32),),
        hidden=128,
        layers=4,
        heads=4,
        intermediate=256,
        lr=lr,
        seed=0,
        max_positions=64,
        tokenizer_domains=PAIR_VOCAB,
        vocab_size=512,
    )


def _text_model(
    name: str, description: str, examples: tuple[str, ...], steps: int, hidden: int = 128, lr: float = 5e-3,
    layers: int = 3,
) -> ModelRecipe:
    """A continuation specialist with its own 1024-token vocabulary; with 3 layers ~0.8M parameters at
    width 128 and ~1.6M at width 192, with 2 layers ~1.2M at width 192."""
    return ModelRecipe(
        name=name,
        description=description,
        examples=examples,
        plan=(DomainPlan(name, steps, 32, 128),),
        hidden=hidden,
        layers=layers,
        heads=4,
        intermediate=3 * hidden,
        lr=lr,
        seed=0,
        tokenizer_domains=(name,),
        vocab_size=1024,
    )


SKILLS = {
    "arithmetic": "adds two numbers written like 37+48=",
    "sorting": "sorts single digits written like sort 9 3 5 =",
    "code": "continues Python source code",
    "prose": "continues English technical prose about Python",
}


def _generalist(
    specialists: tuple[ModelRecipe, ...], steps: Mapping[str, int] | None = None, **shape: int | float
) -> ModelRecipe:
    """A baseline trained on every specialist's domain with the same batch shape: each domain's steps
    are the specialist's unless `steps` names them."""
    plan = tuple(
        dataclasses.replace(p, steps=(steps or {}).get(p.domain, p.steps)) for m in specialists for p in m.plan
    )
    skills = "; ".join(SKILLS[p.domain] for p in plan)
    return ModelRecipe(
        name="generalist",
        description=f"One larger general model for every task of this fleet: it {skills}.",
        examples=tuple(m.examples[0] for m in specialists) + tuple(m.examples[1] for m in specialists[:2]),
        plan=plan,
        baseline=True,
        **shape,  # type: ignore[arg-type]
    )


def tiny() -> FleetRecipe:
    """Arithmetic and sorting specialists (~0.7M parameters) and a ~0.8M generalist; about 90 s on 2 cores.

    Arithmetic gets most of the budget: it needs ~900 steps before it generalises (about 85% held-out
    exact match); sorting is trained only briefly and is a placeholder in this profile.
    """
    arith = _pair_model("arith", "arithmetic", ARITH_DESC, ARITH_EXAMPLES, steps=900)
    sort = _pair_model("sort", "sorting", SORT_DESC, SORT_EXAMPLES, steps=60)
    general = _generalist(
        (arith, sort), hidden=136, layers=4, heads=4, intermediate=272, lr=3e-3, seed=0, max_positions=64
    )
    return FleetRecipe(
        profile="tiny",
        models=(arith, sort, general),
        vocab_size=512,
        data=DataRecipe(arithmetic_ops=("+",), eval_items_pairs=300, eval_items_text=60),
    )


def demo() -> FleetRecipe:
    """Four specialists (arithmetic, sorting, Python code, English prose; 0.7-1.2M parameters) and a
    generalist baseline of 4.0M parameters (6 layers, width 224) trained on all of their domains.

    The baseline is the "one large model" of the paper's comparison: several times a specialist's size,
    so several times its cost per token. The fleet is compared at equal training compute: the four
    specialists together cost less than half of the baseline's training (parameters × tokens), and each
    spends its share on its own domain: arithmetic 2,500 steps and sorting 2,000 where the baseline
    takes 1,000 each; code 3,600 steps and prose 2,700 at width 192 where the baseline takes 1,800 each.

    Code and prose have 2 layers (a 32-token continuation costs 31 % of the baseline's CPU time on an
    Intel Xeon, 43-45 % with 3) and 1.5x the steps of their earlier 3-layer recipe, so their training
    costs what it did. 2026-12-06, one Intel machine, 400 fresh held-out prompts per domain on two draws,
    each model's chrF minus the baseline's on the same prompts (95 % interval): code 2 layers at 3,600
    steps +1.08 [+0.28, +1.87] and +0.36 [-0.49, +1.21] (at 2,400: +0.52, -0.17; 3 layers at 2,400:
    +0.69, -0.11), prose 2 layers at 2,700 steps +0.04 [-0.86, +0.95] and +0.22 [-0.72, +1.16] (at 1,800:
    -0.15, +0.10; 3 layers at 1,800: +0.19, +0.61). Earlier (2026-11-29) prose at width 128 lost to the
    baseline (held-out chrF 21.5 against 23.7). The baseline's training (5,600 steps) is most of the
    build, so the builder trains one model at a time on every thread (specialists first): one to two
    hours on 2 cores.

    Arithmetic trains at half the pair models' learning rate: at 3e-3 its training is unstable (held-out
    exact match 99.3 % at 1,000 steps with seed 0, 39 % with seed 1, 94.3 % at 2,500 steps); at 1.5e-3
    and 2,500 steps it gave 99.0 % and 99.7 % (seeds 0 and 1).
    """
    arith = _pair_model("arith", "arithmetic", ARITH_DESC, ARITH_EXAMPLES, steps=2500, lr=1.5e-3)
    sort = _pair_model("sort", "sorting", SORT_DESC, SORT_EXAMPLES, steps=2000)
    code = _text_model("code", CODE_DESC, CODE_EXAMPLES, steps=3600, hidden=192, lr=4e-3, layers=2)
    prose = _text_model("prose", PROSE_DESC, PROSE_EXAMPLES, steps=2700, hidden=192, lr=4e-3, layers=2)
    general = _generalist(
        (arith, sort, code, prose),
        steps={"arithmetic": 1000, "sorting": 1000, "code": 1800, "prose": 1800},
        hidden=224,
        layers=6,
        heads=4,
        intermediate=640,
        lr=2e-3,
        seed=0,
        max_positions=512,
    )
    return FleetRecipe(
        profile="demo",
        models=(arith, sort, code, prose, general),
        vocab_size=1024,
        data=DataRecipe(arithmetic_ops=("+",), eval_items_pairs=300, eval_items_text=60),
        exemplars_per_model=2048,  # the domain classifier separates code from prose better the more it sees
        # One of MiniLM's six layers: held-out routing with the domain classifier as accurate as with two or
        # six (2026-12-06, 500 drawn prompts per text domain: code 96.6 %, prose 99.2 % with one layer and
        # with two) for a quarter less embedding time per query than two layers (which took half of six's).
        embedder_layers=1,
    )


PROFILES: Mapping[str, FleetRecipe] = {"tiny": tiny(), "demo": demo()}
