"""The built-in fleet profiles: `tiny` (CI and tests, about a minute) and `demo` (the `calm demo` fleet)."""

from __future__ import annotations

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


def _pair_model(name: str, domain: str, description: str, examples: tuple[str, ...], steps: int) -> ModelRecipe:
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
        lr=3e-3,
        seed=0,
        max_positions=64,
        tokenizer_domains=PAIR_VOCAB,
        vocab_size=512,
    )


def _text_model(name: str, description: str, examples: tuple[str, ...], steps: int) -> ModelRecipe:
    """A ~0.8M-parameter continuation specialist (3 layers, width 128, own 1024-token vocabulary)."""
    return ModelRecipe(
        name=name,
        description=description,
        examples=examples,
        plan=(DomainPlan(name, steps, 32, 128),),
        hidden=128,
        layers=3,
        heads=4,
        intermediate=384,
        lr=5e-3,
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


def _generalist(specialists: tuple[ModelRecipe, ...], **shape: int | float) -> ModelRecipe:
    """A baseline trained on every specialist's plan (so at least their summed steps × tokens)."""
    plan = tuple(p for m in specialists for p in m.plan)
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
    """Four specialists (arithmetic, sorting, Python code, English prose; 0.69-0.77M parameters) and a
    generalist baseline of 4.0M parameters (6 layers, width 224) trained on all of their data.

    The baseline is the "one large model" of the paper's comparison: several times a specialist's size,
    so several times its cost per token. Code and prose get 1,800 steps each, on both sides (each step
    draws new windows of the corpus). The baseline's training (5,600 steps) is about 85 % of the build,
    so the builder trains one model at a time on every thread: about 110 minutes on 2 cores (125 while
    other jobs shared the machine).
    """
    arith = _pair_model("arith", "arithmetic", ARITH_DESC, ARITH_EXAMPLES, steps=1000)
    sort = _pair_model("sort", "sorting", SORT_DESC, SORT_EXAMPLES, steps=1000)
    code = _text_model("code", CODE_DESC, CODE_EXAMPLES, steps=1800)
    prose = _text_model("prose", PROSE_DESC, PROSE_EXAMPLES, steps=1800)
    general = _generalist(
        (arith, sort, code, prose), hidden=224, layers=6, heads=4, intermediate=640, lr=2e-3, seed=0, max_positions=512
    )
    return FleetRecipe(
        profile="demo",
        models=(arith, sort, code, prose, general),
        vocab_size=1024,
        data=DataRecipe(arithmetic_ops=("+",), eval_items_pairs=300, eval_items_text=60),
        exemplars_per_model=2048,  # the domain classifier separates code from prose better the more it sees
    )


PROFILES: Mapping[str, FleetRecipe] = {"tiny": tiny(), "demo": demo()}
