"""Workloads: which prompts arrive when. Open-loop Poisson arrivals whose domain mix shifts over time."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# Output budget per domain: long enough for the held-out references, short enough to keep runs quick.
MAX_NEW_TOKENS = {"arithmetic": 6, "sorting": 16, "code": 32, "prose": 32}
DEFAULT_MAX_NEW_TOKENS = 32
SIZES = {"small": 80, "medium": 240, "large": 800}


@dataclass(frozen=True, slots=True)
class Item:
    """One query of a workload: when it is sent (seconds from the start), its domain, prompt and reference."""

    t: float
    domain: str
    prompt: str
    reference: str
    max_new_tokens: int


def read_eval_sets(eval_files: dict[str, Path]) -> dict[str, list[dict[str, str]]]:
    """The fleet's held-out eval sets, by domain."""
    out: dict[str, list[dict[str, str]]] = {}
    for domain, path in eval_files.items():
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        out[domain] = rows
    return out


def queries_for(size: str | int) -> int:
    if isinstance(size, int) or str(size).isdigit():
        return max(1, int(size))
    try:
        return SIZES[str(size)]
    except KeyError:
        raise ValueError(f"workload size must be a number or one of {sorted(SIZES)}, got {size!r}") from None


def shifting_mix(eval_sets: dict[str, list[dict[str, str]]], n: int, rate_qps: float, seed: int = 7,
                 phases: int = 3, dominant_share: float = 0.6) -> list[Item]:
    """``n`` queries at ``rate_qps`` (Poisson); in each phase one domain takes ``dominant_share`` of traffic."""
    if rate_qps <= 0:
        raise ValueError("rate must be > 0 queries/s")
    domains = sorted(d for d, rows in eval_sets.items() if rows)
    if not domains:
        raise ValueError("the fleet has no eval sets to draw prompts from")
    rng = random.Random(seed)
    cursors = {d: rng.randrange(len(eval_sets[d])) for d in domains}
    items: list[Item] = []
    t = 0.0
    for i in range(n):
        phase = min(phases - 1, i * phases // n)
        dominant = domains[phase % len(domains)]
        weights = [dominant_share if d == dominant else (1 - dominant_share) / max(1, len(domains) - 1)
                   for d in domains]
        domain = rng.choices(domains, weights)[0] if len(domains) > 1 else domains[0]
        rows = eval_sets[domain]
        row = rows[cursors[domain] % len(rows)]
        cursors[domain] += 1
        items.append(Item(round(t, 4), domain, row["prompt"], row["reference"],
                          MAX_NEW_TOKENS.get(domain, DEFAULT_MAX_NEW_TOKENS)))
        t += rng.expovariate(rate_qps)
    return items


def bursty_mix(eval_sets: dict[str, list[dict[str, str]]], n: int, rate_qps: float, seed: int = 7,
               burst_factor: float = 4.0, burst_share: float = 0.2) -> list[Item]:
    """A shifting mix whose arrival rate jumps ``burst_factor``-fold for short bursts (``burst_share`` of time)."""
    base = shifting_mix(eval_sets, n, rate_qps, seed)
    rng = random.Random(seed + 1)
    out: list[Item] = []
    t = 0.0
    burst_left = 0
    for item in base:
        if burst_left == 0 and rng.random() < burst_share / 10:
            burst_left = 10
        rate = rate_qps * (burst_factor if burst_left else 1.0)
        burst_left = max(0, burst_left - 1)
        out.append(Item(round(t, 4), item.domain, item.prompt, item.reference, item.max_new_tokens))
        t += rng.expovariate(rate)
    return out


def from_trace(path: Path, eval_sets: dict[str, list[dict[str, str]]], model_domains: dict[str, str],
               limit: int | None = None) -> list[Item]:
    """Queries at the times of a trace file (JSONL ``{"t", "domain"|"model"}``), prompts from the eval sets."""
    items: list[Item] = []
    cursors: dict[str, int] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            t = float(row["t"])
            domain = row.get("domain") or model_domains[row["model"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{number}: expected {{\"t\": seconds, \"domain\"|\"model\": name}}: {e}") from e
        rows = eval_sets.get(domain)
        if not rows:
            raise ValueError(f"{path}:{number}: the fleet has no eval set for domain {domain!r}")
        i = cursors.get(domain, 0)
        cursors[domain] = i + 1
        row_item = rows[i % len(rows)]
        items.append(Item(t, domain, row_item["prompt"], row_item["reference"],
                          MAX_NEW_TOKENS.get(domain, DEFAULT_MAX_NEW_TOKENS)))
        if limit is not None and len(items) >= limit:
            break
    start = min((i.t for i in items), default=0.0)
    return sorted((Item(i.t - start, i.domain, i.prompt, i.reference, i.max_new_tokens) for i in items),
                  key=lambda i: i.t)
