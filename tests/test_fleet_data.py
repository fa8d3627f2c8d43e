"""Data recipes: deterministic, held-out eval sets never seen in training (fast; no torch)."""

from __future__ import annotations

import itertools

import pytest

from workers.fleet.corpora import Code, Prose
from workers.fleet.data import DOMAINS, PAIR_DOMAINS, DataRecipe, eval_items, get_domain
from workers.fleet.profiles import ARITH_EXAMPLES, PROFILES, _generalist, _pair_model
from workers.fleet.recipes import recipe_hash
from workers.fleet.runner import training_cost
from workers.fleet.synthetic import Arithmetic, Sorting
from workers.fleet.train import interleave


def _training_prompts(profile: str, domain: str) -> set[str]:
    """Every prompt any model of `profile` trains on in `domain`, regenerated from the recipe."""
    recipe = PROFILES[profile]
    gen = get_domain(domain, recipe.data)
    assert isinstance(gen, Arithmetic | Sorting)
    seen: set[str] = set()
    for model in recipe.models:
        for plan in model.plan:
            if plan.domain == domain:
                rows = itertools.islice(gen.train_pairs(model.seed), plan.steps * plan.batch)
                seen.update(p for p, _ in rows)
    return seen


@pytest.mark.parametrize("domain", PAIR_DOMAINS)
def test_pair_eval_sets_never_appear_in_training(domain: str) -> None:
    for profile in PROFILES:
        data = PROFILES[profile].data
        items = eval_items(domain, data)
        assert len(items) >= 200
        assert len({i.prompt for i in items}) == len(items)
        trained = _training_prompts(profile, domain)
        assert trained, "the profile trains on this domain"
        assert not trained & {i.prompt for i in items}
        gen = get_domain(domain, data)
        assert isinstance(gen, Arithmetic | Sorting)
        assert all(gen.is_heldout_prompt(i.prompt) for i in items)


def test_addition_holds_out_both_orders_of_a_pair() -> None:
    arith = Arithmetic()
    for item in arith.eval_items(300, seed=1):
        a, b = item.prompt[:-1].split("+")
        assert arith.is_heldout_prompt(f"{b}+{a}=")
        assert int(item.reference) == int(a) + int(b)


def test_sorting_answers_are_sorted_digits() -> None:
    for item in Sorting().eval_items(50, seed=3):
        digits = item.prompt.removeprefix("sort ").removesuffix(" =").split()
        assert 3 <= len(digits) <= 6
        assert item.reference == " ".join(sorted(digits))
    prompt, completion = next(Sorting().train_pairs(0))
    assert prompt.startswith("sort ") and prompt.endswith(" =") and completion.startswith(" ")


@pytest.mark.parametrize("gen", [Code(), Prose()], ids=["code", "prose"])
def test_text_eval_items_come_from_held_out_documents_only(gen: Code | Prose) -> None:
    data = DataRecipe()
    items = eval_items(gen.name, data)
    assert len(items) >= 50
    held = gen.heldout_keys()
    assert held
    train_keys = {k for k, _ in gen.train_documents(seed=0)}
    assert not held & train_keys
    held_docs = [t for k, t in gen._docs(heldout=True)]
    for item in items:
        assert len(item.reference) == 64 and item.prompt.endswith("\n")
        assert any(item.prompt + item.reference in doc for doc in held_docs)


@pytest.mark.parametrize("domain", DOMAINS)
def test_generators_are_deterministic(domain: str) -> None:
    data = DataRecipe()
    assert eval_items(domain, data) == eval_items(domain, data)
    gen = get_domain(domain, data)
    if isinstance(gen, Arithmetic | Sorting):
        assert list(itertools.islice(gen.train_pairs(5), 50)) == list(itertools.islice(gen.train_pairs(5), 50))
    else:
        first = [k for k, _ in itertools.islice(gen.train_documents(5), 5)]
        assert first == [k for k, _ in itertools.islice(gen.train_documents(5), 5)]


def test_recipe_hash_is_stable_and_tracks_the_recipe() -> None:
    assert recipe_hash("tiny") == recipe_hash(PROFILES["tiny"])
    assert len(recipe_hash("tiny")) == 64
    assert recipe_hash("tiny") != recipe_hash("demo")
    assert recipe_hash(PROFILES["tiny"].scaled(0.5)) != recipe_hash("tiny")


def test_generalists_cost_at_least_the_specialists_training_and_cover_their_domains() -> None:
    for recipe in PROFILES.values():
        base = [m for m in recipe.models if m.baseline]
        assert len(base) == 1
        specialists = [m for m in recipe.models if not m.baseline]
        assert training_cost(base[0]) >= sum(training_cost(m) for m in specialists)
        assert set(base[0].domains) == {d for m in specialists for d in m.domains}
        shapes = {(p.domain, p.batch, p.seq_len) for m in specialists for p in m.plan}
        assert {(p.domain, p.batch, p.seq_len) for p in base[0].plan} == shapes
        for m in recipe.models:
            assert 4 <= len(m.examples) <= 6 and m.description


def test_generalist_takes_the_specialists_steps_unless_told() -> None:
    spec = _pair_model("arith", "arithmetic", "adds", ARITH_EXAMPLES, steps=300)
    assert _generalist((spec,), hidden=32, layers=1, heads=1, intermediate=64, lr=1e-3, seed=0).plan[0].steps == 300
    told = _generalist(
        (spec,), steps={"arithmetic": 120}, hidden=32, layers=1, heads=1, intermediate=64, lr=1e-3, seed=0
    )
    assert told.plan[0].steps == 120 and told.plan[0].batch == spec.plan[0].batch


def test_interleave_spreads_each_domains_steps() -> None:
    plan = PROFILES["tiny"].models[-1].plan
    order = interleave(plan)
    assert len(order) == sum(p.steps for p in plan)
    for k, p in enumerate(plan):
        assert order.count(k) == p.steps
