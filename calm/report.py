"""Turns recorded replies into the contract's report: per strategy and per domain, plus a comparison."""

from __future__ import annotations

import json
import math
import platform
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from calm.loadgen import Run
from workers.energy import DEFAULT_WATTS_PER_CORE
from workers.fleet.quality import metric_for, score


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return round(ordered[rank], 3)


def quality_of(domain: str, text: str, reference: str) -> float:
    """Quality in 0..1: exact match, or chrF / 100 for continuation domains."""
    value = score(domain, text, reference)
    return value / 100.0 if metric_for(domain) == "chrf" else value


def stats(rows: list[dict[str, Any]], duration_s: float, cold_loads: int) -> dict[str, Any]:
    """The contract's STATS for a set of (item, reply) rows."""
    ok = [r for r in rows if r["reply"] and r["reply"].get("status") == "ok"]

    def floats(key: str) -> list[float]:
        return [float(r["reply"][key]) for r in ok if r["reply"].get(key) not in (None, "")]

    latency = floats("latency_ms")
    route = floats("route_ms")
    energy = floats("energy_j")
    sources = Counter(r["reply"].get("energy_source", "") for r in ok)
    quality = [r["quality"] for r in rows]
    return {
        "queries": len(rows),
        "replied": sum(1 for r in rows if r["reply"]),
        "errors": sum(1 for r in rows if r["reply"] and r["reply"].get("status") != "ok"),
        "latency_p50_ms": percentile(latency, 50),
        "latency_p95_ms": percentile(latency, 95),
        "latency_p99_ms": percentile(latency, 99),
        "queue_ms_p50": percentile(floats("queue_ms"), 50),
        "inference_ms_p50": percentile(floats("inference_ms"), 50),
        "throughput_qps": round(len(ok) / duration_s, 3) if duration_s > 0 else None,
        "energy_j_per_query": round(statistics.fmean(energy), 5) if energy else None,
        "energy_source": sources.most_common(1)[0][0] if sources else "",
        "quality": round(statistics.fmean(quality), 4) if quality else None,
        "route_ms_p50": percentile(route, 50),
        "route_ms_p99": percentile(route, 99),
        "route_split_ms_p50": route_split(ok),
        "cache_hits": sum(1 for r in ok if r["reply"].get("cached") == "1"),
        "cold_loads": cold_loads,
        "routed": dict(Counter(r["reply"].get("model", "") for r in ok)),
    }


# route_ms's stages: each is the time between two of the reply's marks (ms after arrival).
ROUTE_STAGES = (("claim", "", "at_monitor_ms"), ("embed", "at_monitor_ms", "at_embedded_ms"),
                ("analyze", "at_embedded_ms", "at_analyzer_ms"), ("plan", "at_analyzer_ms", "at_planner_ms"),
                ("dispatch", "at_planner_ms", "route_ms"))


def route_split(ok: list[dict[str, Any]]) -> dict[str, float | None]:
    """Median time of each route stage over the replies that ran a model and carry every mark.

    claim: ingress to the monitor sending its claim (the hop and validation); embed: the embedding, which
    runs while the claim's round trip travels, and that round trip's end; analyze: hop and scoring; plan:
    hop and decision; dispatch: hop, cache lookup and dispatch. Stages sum to route_ms query by query, not
    median by median.
    """
    marks = [r["reply"] for r in ok if r["reply"].get("cached") in ("0", 0, False)
             and all(r["reply"].get(m) not in (None, "") for _, _, m in ROUTE_STAGES)]
    return {stage: percentile([float(rep[end]) - (float(rep[start]) if start else 0.0) for rep in marks], 50)
            for stage, start, end in ROUTE_STAGES}


def _check_same_workload(base: Run, other: Run) -> None:
    """Refuse to pair two runs that did not send the same prompts in the same order."""
    if [i.prompt for i in base.items] != [i.prompt for i in other.items]:
        raise ValueError(f"{other.strategy} and {base.strategy} did not run the same workload")


def paired_quality(base: Run, other: Run) -> dict[str, dict[str, Any]]:
    """Quality of ``other`` minus ``base`` per domain, query by query (both ran the same workload).

    The mean difference with its standard error and a normal 95 % interval; ``verdict`` says whether the
    interval lies wholly below zero (``lower``), above it (``higher``) or spans it (``no difference found``,
    which is not proof of equality: see the interval's width).
    """
    _check_same_workload(base, other)
    diffs: dict[str, list[float]] = {}
    for item, was, now in zip(base.items, item_qualities(base), item_qualities(other), strict=True):
        diffs.setdefault(item.domain, []).append(now - was)
    out = {}
    for domain, values in sorted(diffs.items()):
        n = len(values)
        mean = statistics.fmean(values)
        se = statistics.stdev(values) / math.sqrt(n) if n > 1 else None
        low, high = (mean - 1.96 * se, mean + 1.96 * se) if se is not None else (None, None)
        verdict = ("lower" if high is not None and high < 0 else "higher" if low is not None and low > 0
                   else "no difference found")
        out[domain] = {"n": n, "diff": round(mean, 4), "se": None if se is None else round(se, 4),
                       "ci95": [None if low is None else round(low, 4), None if high is None else round(high, 4)],
                       "verdict": verdict}
    return out


BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 20261206


def paired_change_intervals(base: Run, other: Run, samples: int = BOOTSTRAP_SAMPLES,
                            seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """95 % intervals of ``other``'s change against ``base`` in % (p50 latency, mean energy per query).

    A paired bootstrap over the workload's queries: each resample draws query positions with
    replacement and takes both runs' replies at those positions, so the domain mix moves together in
    both. It measures how much a run's figure depends on which queries it happened to get, not how much
    the machine drifts between runs (run the bench again for that). Deterministic for a given ``seed``;
    a query without an ok reply counts in neither figure, as in the report's stats.
    """
    _check_same_workload(base, other)
    out: dict[str, Any] = {"method": f"paired bootstrap over queries, {samples} resamples", "samples": samples,
                           "latency_p50_ms": [None, None], "energy_j_per_query": [None, None]}
    if not base.items:
        return out
    picks = np.random.default_rng(seed).integers(0, len(base.items), size=(samples, len(base.items)))
    for key, field_name in (("latency_p50_ms", "latency_ms"), ("energy_j_per_query", "energy_j")):
        was, now = _reply_values(base, field_name)[picks], _reply_values(other, field_name)[picks]
        summary = _nearest_rank_medians if key == "latency_p50_ms" else _means
        with np.errstate(divide="ignore", invalid="ignore"):  # a resample of failed queries only: NaN, dropped
            stat_was, stat_now = summary(was), summary(now)
            change = 100.0 * (stat_now - stat_was) / stat_was
        change = change[np.isfinite(change)]
        out[key] = ([round(float(np.percentile(change, 2.5)), 1), round(float(np.percentile(change, 97.5)), 1)]
                    if change.size else [None, None])
    return out


def _reply_values(run: Run, field_name: str) -> np.ndarray:
    """``field_name`` of each query's ok reply in workload order (NaN where there is none)."""
    values = []
    for qid in run.ids:
        reply = run.replies.get(qid)
        raw = reply.get(field_name) if reply and reply.get("status") == "ok" else None
        values.append(float(raw) if raw not in (None, "") else math.nan)
    return np.asarray(values, dtype=np.float64)


def _means(rows: np.ndarray) -> np.ndarray:
    """Each row's mean over its non-NaN values (NaN for a row of NaNs, without numpy's empty-slice warning)."""
    kept = ~np.isnan(rows)
    return np.where(kept, rows, 0.0).sum(axis=1) / kept.sum(axis=1)


def _nearest_rank_medians(rows: np.ndarray) -> np.ndarray:
    """Each row's median as :func:`percentile` takes it (nearest rank, NaNs left out); NaN for an empty row."""
    ordered = np.sort(rows, axis=1)  # NaNs sort last
    counts = np.count_nonzero(~np.isnan(rows), axis=1)
    ranks = np.clip(np.round(0.5 * counts + 0.5).astype(np.int64) - 1, 0, None)
    medians = np.take_along_axis(ordered, ranks[:, None], axis=1)[:, 0]
    return np.where(counts > 0, medians, np.nan)


def item_qualities(run: Run) -> list[float]:
    """Each query's quality in workload order (a query without an ok reply scores as an empty answer)."""
    out = []
    for qid, item in zip(run.ids, run.items, strict=True):
        reply = run.replies.get(qid)
        text = reply.get("text", "") if reply and reply.get("status") == "ok" else ""
        out.append(quality_of(item.domain, text, item.reference))
    return out


def control_plane(cpu_s: dict[str, float], roles: Sequence[str], replied: int, inference_j: float | None,
                  watts_per_core: float) -> dict[str, Any]:
    """What the control plane (the processes named ``roles``) cost during a run, as an energy estimate.

    Per-query inference energy leaves out the processes that route, cache and schedule; this adds their
    CPU seconds × ``watts_per_core`` per replied query, so strategies compare on all the energy they cause.
    Unknown (None) when a role was not measured or nothing was replied.
    """
    if not roles or any(role not in cpu_s for role in roles) or replied == 0:
        return {"control_cpu_s": None, "control_energy_j_per_query": None, "energy_all_in_j_per_query": None}
    seconds = sum(cpu_s[role] for role in roles)
    control = seconds * watts_per_core / replied
    return {"control_cpu_s": round(seconds, 3),
            "control_energy_j_per_query": round(control, 5),
            "energy_all_in_j_per_query": round(control + inference_j, 5) if inference_j is not None else None}


def strategy_report(run: Run, loads: Iterable[tuple[float, str]], control_roles: Sequence[str] = (),
                    watts_per_core: float = DEFAULT_WATTS_PER_CORE) -> dict[str, Any]:
    """Overall and per-domain STATS of one run; ``loads`` are (ms, model) cold loads seen during it.

    The overall STATS also say what the control plane (the processes named ``control_roles``) cost,
    from the CPU seconds the run recorded (``control_plane``).
    """
    rows: list[dict[str, Any]] = [{"item": item, "reply": run.replies.get(qid), "quality": quality}
            for qid, item, quality in zip(run.ids, run.items, item_qualities(run), strict=True)]
    window = [m for t, m in loads if run.started_ms <= t <= run.ended_ms]
    duration_s = (run.ended_ms - run.started_ms) / 1000
    out: dict[str, Any] = {"overall": stats(rows, duration_s, len(window)), "domains": {}}
    overall = out["overall"]
    overall.update(control_plane(run.cpu_s, control_roles, overall["replied"] - overall["errors"],
                                 overall["energy_j_per_query"], watts_per_core))
    overall["cpu_s"] = dict(run.cpu_s)
    for domain in sorted({r["item"].domain for r in rows}):
        mine = [r for r in rows if r["item"].domain == domain]
        models = {r["reply"].get("model") for r in mine if r["reply"]}
        domain_stats = stats(mine, duration_s, sum(1 for m in window if m in models))
        domain_stats["quality_metric"] = metric_for(domain)
        out["domains"][domain] = domain_stats
    out["duplicates"] = run.duplicates
    out["pinned"] = run.pinned
    return out


def change_pct(new: float | None, base: float | None) -> float | None:
    if new is None or base in (None, 0):
        return None
    assert base is not None
    return round(100.0 * (new - base) / base, 1)


def comparison(strategies: dict[str, Any], baseline: str = "single", runs: dict[str, Run] | None = None
               ) -> dict[str, Any]:
    """Each strategy's change against ``baseline`` in %, overall and per domain; given the ``runs``, each
    domain also gets ``quality_paired`` (:func:`paired_quality`) and the strategy ``intervals`` of its
    overall latency and energy changes (:func:`paired_change_intervals`)."""
    base = strategies.get(baseline)
    if base is None:
        return {}
    keys = ("latency_p50_ms", "latency_p95_ms", "energy_j_per_query", "quality")
    overall_keys = (*keys, "energy_all_in_j_per_query")
    out: dict[str, Any] = {}
    for name, rep in strategies.items():
        if name == baseline:
            continue
        out[name] = {"overall": {k: change_pct(rep["overall"].get(k), base["overall"].get(k)) for k in overall_keys},
                     "domains": {d: {k: change_pct(s[k], base["domains"].get(d, {}).get(k)) for k in keys}
                                 for d, s in rep["domains"].items()}}
        if runs is not None and name in runs and baseline in runs:
            for domain, paired in paired_quality(runs[baseline], runs[name]).items():
                out[name]["domains"].setdefault(domain, {})["quality_paired"] = paired
            out[name]["intervals"] = paired_change_intervals(runs[baseline], runs[name])
    return out


def machine_info() -> dict[str, Any]:
    import os

    import onnxruntime

    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers(),
            "at": datetime.now(UTC).isoformat(timespec="seconds")}


def write_records(out_dir: Path, runs: Iterable[Run]) -> Path:
    """Every query and its reply, one JSON line each: the raw data every figure is computed from."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "replies.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for run in runs:
            for qid, item in zip(run.ids, run.items, strict=True):
                row = {"strategy": run.strategy, "id": qid, "t": item.t, "domain": item.domain, "prompt": item.prompt,
                       "reference": item.reference, "reply": run.replies.get(qid)}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_all(out_dir: Path, report: dict[str, Any], runs: Iterable[Run]) -> Path:
    """Everything a demo or bench run leaves: raw replies, plots (named in the report), JSON and Markdown."""
    from calm.plots import write_plots

    runs = list(runs)
    write_records(out_dir, runs)
    report["plots"] = [p.name for p in write_plots(out_dir, report, runs)]
    return write_report(out_dir, report)


def write_report_json(out_dir: Path, report: dict[str, Any]) -> Path:
    """Write only report.json (reports without strategies, such as overhead)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    return out_dir


def write_report(out_dir: Path, report: dict[str, Any]) -> Path:
    """Write report.json and report.md; returns the directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    (out_dir / "report.md").write_text(markdown(report), encoding="utf-8")
    return out_dir


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """Rows of the summary table: strategy, domain, queries, routing, latency, energy, quality, changes."""
    rows = []
    changes = report.get("comparison", {})
    for name, rep in report["strategies"].items():
        for domain, s in [("overall", rep["overall"]), *rep["domains"].items()]:
            change = changes.get(name, {})
            delta = (change.get("overall") if domain == "overall" else change.get("domains", {}).get(domain)) or {}
            routed = " ".join(f"{m}:{c}" for m, c in sorted(s["routed"].items()))
            rows.append([name, domain, str(s["queries"]), routed, _fmt(s["latency_p50_ms"]), _fmt(s["latency_p95_ms"]),
                         _fmt(s["energy_j_per_query"], 4), _fmt(s.get("energy_all_in_j_per_query"), 4),
                         _fmt(s["quality"], 3), _pct(delta.get("latency_p50_ms")),
                         _pct(delta.get("energy_j_per_query")), _pct(delta.get("energy_all_in_j_per_query")),
                         _pct(delta.get("quality"))])
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


HEADERS = ["strategy", "domain", "n", "routed to", "p50 ms", "p95 ms", "J/query", "J all-in", "quality", "Δp50", "ΔJ",
           "ΔJ all-in", "ΔQ"]


def _sources(report: dict[str, Any]) -> str:
    return ", ".join(sorted({rep["overall"]["energy_source"] for rep in report["strategies"].values()}))


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# {report.get('title', 'CALM report')}", "", f"Fleet: `{report['fleet'].get('root', '')}`  ",
             f"Machine: {report['machine'].get('platform')} ({report['machine'].get('cpus')} CPUs), "
             f"onnxruntime {report['machine'].get('onnxruntime')}  ",
             f"Workload: {report.get('workload', {})}", "",
             f"Energy source: {_sources(report)}. Δ columns: change against `single`.", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in table_rows(report):
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Energy source `estimate` = CPU seconds of the inference thread × watts per core "
              "(configurable, `worker.watts_per_core`); `nvml` = GPU energy counter; `rapl` = CPU package counter.",
              "J all-in = J/query + the control plane's share: CPU seconds of the five actor processes (monitor, "
              "analyzer, planner, executor, scheduler) during the run × watts per core ÷ replies (an estimate).",
              "Quality: exact match (arithmetic, sorting) or chrF/100 (code, prose) on held-out prompts.", ""]
    lines += _interval_lines(report)
    lines += _paired_section(report)
    return "\n".join(lines)


def _interval_lines(report: dict[str, Any]) -> list[str]:
    """One line per strategy: its overall Δp50 and ΔJ against `single` with their 95 % intervals."""
    lines = []
    for name, change in report.get("comparison", {}).items():
        intervals = change.get("intervals")
        if not intervals:
            continue
        parts = []
        for key, label in (("latency_p50_ms", "Δp50"), ("energy_j_per_query", "ΔJ")):
            low, high = intervals.get(key, [None, None])
            value = change.get("overall", {}).get(key)
            bounds = "" if low is None else f" ({low:+.1f} to {high:+.1f} %)"
            parts.append(f"{label} {_pct(value)}{bounds}")
        lines.append(f"`{name}` against `single`: " + ", ".join(parts) + ".")
    if not lines:
        return []
    return [*lines, "", "In brackets: 95 % intervals from a paired bootstrap over this run's queries (how much "
            "the figure depends on which queries came; machine drift between runs is not in them).", ""]


def _paired_section(report: dict[str, Any]) -> list[str]:
    rows = [(name, domain, d["quality_paired"]) for name, change in report.get("comparison", {}).items()
            for domain, d in change.get("domains", {}).items() if "quality_paired" in d]
    if not rows:
        return []
    lines = ["Quality against `single`, query by query (same prompts): mean difference (quality units), "
             "95 % interval, verdict.", "", "| strategy | domain | n | Δ quality | 95 % interval | verdict |",
             "|---|---|---|---|---|---|"]
    for name, domain, p in rows:
        low, high = p["ci95"]
        interval = "-" if low is None else f"[{low:+.3f}, {high:+.3f}]"
        lines.append(f"| {name} | {domain} | {p['n']} | {p['diff']:+.3f} | {interval} | {p['verdict']} |")
    return [*lines, ""]


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=report.get("title", "CALM report"),
                  caption=f"energy source: {_sources(report)}; Δ = change against single")
    for h in HEADERS:
        table.add_column(h)
    for row in table_rows(report):
        table.add_row(*row)
    console = Console()
    console.width = max(console.width, 130)
    console.print(table)
    for line in _interval_lines(report):
        if line:
            console.print(line.replace("`", ""), highlight=False)
