"""PNG plots for reports (needs matplotlib, from the ``report`` extra)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from calm.loadgen import Run


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plots(out_dir: Path, report: dict[str, Any], runs: Iterable[Run]) -> list[Path]:
    """Latency CDF per strategy, energy and quality per domain and strategy, and each run's residency timeline
    (when it recorded worker events). Returns the files written."""
    if not available():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(runs)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        values = sorted(float(r["latency_ms"]) for r in run.replies.values() if r.get("status") == "ok")
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=run.strategy)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of queries")
    ax.set_title("Latency CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    path = out_dir / "latency_cdf.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    strategies = list(report["strategies"])
    domains = sorted({d for rep in report["strategies"].values() for d in rep["domains"]})
    for metric, label, name in (("energy_j_per_query", "energy per query (J)", "energy.png"),
                                ("quality", "quality (0-1)", "quality.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        width = 0.8 / max(1, len(strategies))
        for i, strategy in enumerate(strategies):
            values = [report["strategies"][strategy]["domains"].get(d, {}).get(metric) or 0.0 for d in domains]
            ax.bar([x + i * width for x in range(len(domains))], values, width, label=strategy)
        ax.set_xticks([x + width * (len(strategies) - 1) / 2 for x in range(len(domains))], domains)
        ax.set_ylabel(label)
        ax.set_title(f"{label} by domain")
        ax.legend()
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    for run in runs:
        if run.events:
            arrivals = [(item.t, item.domain) for item in run.items]
            written.append(residency_timeline(out_dir / f"residency-{run.strategy}.png", run.events, arrivals,
                                              run.started_ms, run.ended_ms, f"Residency: {run.strategy}"))
    return written


def residency_timeline(path: Path, events: Sequence[dict[str, Any]], arrivals: Sequence[tuple[float, str]],
                       started_ms: float, ended_ms: float, title: str = "Residency", mix: str = "domain") -> Path:
    """Which model was loaded on which worker over time (from worker events), the arrivals' mix under it.

    Time is in seconds from ``started_ms`` (the first arrival); loads before it (warm-up) show at negative
    times. Failed loads are marked with a cross. Arrivals (``(seconds, label)``, the label a ``mix``: domain
    or model) are counted per bin; labels that are models take the model's colour.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from calm.bench.events import residency_intervals

    intervals = residency_intervals(events, ended_ms)
    lanes = sorted({(r.worker, r.model) for r in intervals} | {(e["worker"], e["model"]) for e in events
                                                                 if e["event"] == "load_failed" and e["model"]})
    labels = sorted({m for _, m in lanes} | {label for _, label in arrivals})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(labels)}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 2.2 + 0.35 * max(1, len(lanes)) + 2.2), sharex=True,
                                      gridspec_kw={"height_ratios": [max(1.5, 0.35 * len(lanes)), 1.6]})
    for y, (worker, model) in enumerate(lanes):
        spans = [((r.start_ms - started_ms) / 1000, (r.end_ms - r.start_ms) / 1000) for r in intervals
                 if (r.worker, r.model) == (worker, model)]
        top.broken_barh(spans, (y - 0.35, 0.7), facecolors=colours[model])
        failed = [(e["at_ms"] - started_ms) / 1000 for e in events
                  if e["event"] == "load_failed" and (e["worker"], e["model"]) == (worker, model)]
        if failed:
            top.plot(failed, [y] * len(failed), "x", color="black")
    top.set_yticks(range(len(lanes)), [f"{w} · {m}" for w, m in lanes])
    top.set_ylim(-0.6, max(0.6, len(lanes) - 0.4))
    top.axvline(0.0, color="grey", lw=0.8, ls="--")
    top.set_title(title)
    top.grid(axis="x", alpha=0.3)
    span_s = max([t for t, _ in arrivals] + [(ended_ms - started_ms) / 1000, 1.0])
    bins = max(1, min(60, len(arrivals) // 4 or 1))
    width = span_s / bins
    domains = sorted({d for _, d in arrivals})
    base = [0] * bins
    for domain in domains:
        counts = [0] * bins
        for t, d in arrivals:
            if d == domain:
                counts[min(bins - 1, max(0, int(t / width)))] += 1
        bottom.bar([i * width for i in range(bins)], counts, width, bottom=base, align="edge", label=domain,
                   color=colours[domain])
        base = [b + c for b, c in zip(base, counts, strict=True)]
    bottom.set_xlabel("seconds since the first arrival")
    bottom.set_ylabel(f"arrivals by {mix}")
    if domains:
        bottom.legend(fontsize="small", ncols=min(4, len(domains)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
