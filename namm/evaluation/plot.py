"""Score against the measured kept-cache fraction, one line per method (matplotlib, Agg)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["plot_score_vs_cache"]


def plot_score_vs_cache(summary: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Each method's settings as points (x: mean kept fraction of the cache, y: mean score with
    its standard error as error bars), joined in order of cache size and labelled with their
    setting; budgetless methods (full cache) are single points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in summary:
        if s["mean_fraction"] is not None:
            by_method[s["method"]].append(s)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, points in sorted(by_method.items()):
        points.sort(key=lambda s: s["mean_fraction"])
        xs = [100 * s["mean_fraction"] for s in points]
        ys = [s["mean_score"] for s in points]
        errors = [s.get("se") or 0.0 for s in points]
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, linestyle="-" if len(points) > 1 else "none",
                    label=method)
        for s, x, y in zip(points, xs, ys):
            if s["setting"] not in ("full",):
                ax.annotate(s["setting"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("mean kept KV cache (% of a full cache, measured)")
    ax.set_ylabel("mean score (± standard error)")
    ax.set_xlim(0, 105)
    ax.grid(alpha=0.3)
    if by_method:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
