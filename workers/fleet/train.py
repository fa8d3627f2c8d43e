"""Training a small LlamaForCausalLM from scratch on a model recipe's data plan (CPU, deterministic).

Pair domains: one (prompt, completion) per row, loss on the completion and EOS only.
Text domains: windows of a document stream (documents joined by EOS) in shuffled order, loss on all tokens.
Steps of the plan's domains are interleaved evenly. The result is a normal HF checkpoint directory.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer

from workers.fleet.corpora import Code, Prose
from workers.fleet.data import DataRecipe, get_domain
from workers.fleet.recipes import DomainPlan, ModelRecipe
from workers.fleet.synthetic import Arithmetic, Sorting
from workers.fleet.tokenizer import EOS, save_hf_tokenizer

if TYPE_CHECKING:
    import torch

IGNORE = -100
StepCallback = Callable[[int, float], None]


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What a training run produced and cost."""

    checkpoint: Path
    params: int
    steps: int
    tokens: int
    wall_s: float
    final_loss: float


def interleave(plan: tuple[DomainPlan, ...]) -> list[int]:
    """Plan indices, one per step, spreading each domain's steps evenly over the run."""
    keyed = [((i + 0.5) / p.steps, k) for k, p in enumerate(plan) for i in range(p.steps)]
    return [k for _, k in sorted(keyed)]


def pair_rows(tok: Tokenizer, pairs: Iterator[tuple[str, str]], eos_id: int) -> Iterator[tuple[list[int], int]]:
    """(token ids, prompt length) per training pair; prompt and completion are encoded separately."""
    for prompt, completion in pairs:
        p = tok.encode(prompt).ids
        c = tok.encode(completion).ids
        yield p + c + [eos_id], len(p)


def text_windows(tok: Tokenizer, docs: Iterator[tuple[str, str]], eos_id: int, length: int) -> Iterator[list[int]]:
    """Consecutive windows of `length` tokens from the documents joined by EOS."""
    buf: list[int] = []
    for _, text in docs:
        buf.extend(tok.encode(text).ids)
        buf.append(eos_id)
        while len(buf) >= length:
            yield buf[:length]
            buf = buf[length:]


def shuffled_windows(windows: Iterator[list[int]], count: int, seed: int) -> Iterator[list[int]]:
    """The first `count` windows in a seeded random order, repeated endlessly.

    Consecutive windows come from the same file; shuffling them makes each batch a mix of files.
    """
    pool = list(itertools.islice(windows, count))
    random.Random(f"windows:{seed}").shuffle(pool)
    return itertools.cycle(pool)


class _Feed:
    """Endless batches for one domain of the plan."""

    def __init__(self, plan: DomainPlan, data: DataRecipe, tok: Tokenizer, eos_id: int, seed: int) -> None:
        self.plan = plan
        self.eos_id = eos_id
        domain = get_domain(plan.domain, data)
        self.pairs: Iterator[tuple[list[int], int]] | None = None
        self.windows: Iterator[list[int]] | None = None
        if isinstance(domain, Arithmetic | Sorting):
            self.pairs = pair_rows(tok, domain.train_pairs(seed), eos_id)
        else:
            assert isinstance(domain, Code | Prose)
            dom = domain

            def cycle() -> Iterator[tuple[str, str]]:
                for epoch in itertools.count():
                    yield from dom.train_documents(seed + epoch)

            self.windows = shuffled_windows(
                text_windows(tok, cycle(), eos_id, plan.seq_len), plan.steps * plan.batch, seed
            )

    def next_batch(self) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        """(input_ids, attention_mask, labels) as right-padded lists."""
        ids: list[list[int]] = []
        labels: list[list[int]] = []
        if self.pairs is not None:
            for row, plen in itertools.islice(self.pairs, self.plan.batch):
                row = row[: self.plan.seq_len]
                ids.append(row)
                labels.append([IGNORE] * plen + row[plen:])
        else:
            assert self.windows is not None
            for window in itertools.islice(self.windows, self.plan.batch):
                ids.append(window)
                labels.append(list(window))
        width = max(len(r) for r in ids)
        mask = [[1] * len(r) + [0] * (width - len(r)) for r in ids]
        ids = [r + [self.eos_id] * (width - len(r)) for r in ids]
        labels = [r + [IGNORE] * (width - len(r)) for r in labels]
        return ids, mask, labels


def configure_torch(threads: int = 2) -> None:
    """Deterministic CPU math on at most `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def build_model(recipe: ModelRecipe, vocab_size: int, eos_id: int) -> Any:
    """A freshly initialised LlamaForCausalLM of the recipe's shape (seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        use_cache=True,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, recipe: ModelRecipe) -> float:
    """Linear warmup then cosine decay to `min_lr_frac` of the peak."""
    total = recipe.steps
    warm = max(1, int(total * recipe.warmup_frac))
    if step < warm:
        return recipe.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    floor = recipe.min_lr_frac
    return recipe.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def train(
    recipe: ModelRecipe,
    data: DataRecipe,
    tok: Tokenizer,
    out_dir: Path,
    on_step: StepCallback | None = None,
    threads: int = 2,
) -> TrainResult:
    """Train `recipe` from scratch and save a HF checkpoint (model, tokenizer, configs) in `out_dir`."""
    import torch

    configure_torch(threads)
    start = time.perf_counter()
    eos_id = tok.token_to_id(EOS)
    model = build_model(recipe, tok.get_vocab_size(), eos_id)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    feeds = [_Feed(p, data, tok, eos_id, recipe.seed) for p in recipe.plan]
    tokens = 0
    loss_value = float("nan")
    model.train()
    for step, k in enumerate(interleave(recipe.plan)):
        ids, mask, labels = feeds[k].next_batch()
        input_ids = torch.tensor(ids)
        attention = torch.tensor(mask)
        tokens += int(attention.sum())
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        out = model(input_ids=input_ids, attention_mask=attention, labels=torch.tensor(labels))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = float(out.loss.detach())
        if on_step is not None:
            on_step(step + 1, loss_value)
    model.eval()
    save_checkpoint(model, tok, out_dir, recipe.max_positions)
    return TrainResult(
        checkpoint=out_dir,
        params=params,
        steps=recipe.steps,
        tokens=tokens,
        wall_s=round(time.perf_counter() - start, 2),
        final_loss=loss_value,
    )


def save_checkpoint(model: torch.nn.Module, tok: Tokenizer, out_dir: Path, max_positions: int) -> None:
    """Write model weights, config, generation_config and tokenizer files as a HF checkpoint."""
    from transformers import GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    eos_id = tok.token_to_id(EOS)
    model.generation_config = GenerationConfig(  # type: ignore[assignment]
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, do_sample=False
    )
    model.save_pretrained(str(out_dir), safe_serialization=True)  # type: ignore[operator]
    save_hf_tokenizer(tok, out_dir, max_positions)
