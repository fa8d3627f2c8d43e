"""PNG plots for reports (needs matplotlib, from the ``report`` extra)."""

from __future__ import annotations

from collections.abc import Iterable
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
    """Latency CDF per strategy, and energy and quality per domain and strategy. Returns the files written."""
    if not available():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    return written
