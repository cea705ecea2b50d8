"""Score against the measured kept-cache fraction, one line per method (matplotlib, Agg)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["plot_score_vs_cache"]


def plot_score_vs_cache(summary: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Each method's settings as points (x: mean kept fraction of the cache, y: mean score with
    its standard error as error bars), joined in order of cache size and labelled with their
    setting when there are few methods (with many, the legend and distinct markers tell them apart);
    budgetless methods (full cache) are single points; the NAMM is drawn thicker, on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in summary:
        if s["mean_fraction"] is not None:
            by_method[s["method"]].append(s)
    many = len(by_method) > 4
    markers = "osD^v<>pPX*h"
    fig, ax = plt.subplots(figsize=(7.5 if many else 6, 4.5 if many else 4), dpi=120)
    for i, (method, points) in enumerate(sorted(by_method.items())):
        points.sort(key=lambda s: s["mean_fraction"])
        xs = [100 * s["mean_fraction"] for s in points]
        ys = [s["mean_score"] for s in points]
        errors = [s.get("se") or 0.0 for s in points]
        own = method == "namm"
        full = method == "full"
        palette = plt.get_cmap("tab20" if many else "tab10")
        color = "black" if own else "dimgray" if full else palette(i % palette.N)
        marker = "*" if own else "s" if full else markers[i % len(markers)]
        ax.errorbar(xs, ys, yerr=errors, marker=marker, capsize=3, color=color,
                    linestyle="-" if len(points) > 1 else "none", label=method, linewidth=2.5 if own else 1.2,
                    markersize=10 if own else 7 if full else 5, zorder=3 if own else 2,
                    alpha=1.0 if own or not many else 0.8)
        for s, x, y in zip(points, xs, ys):
            if s["setting"] not in ("full",) and (not many or own):
                ax.annotate(s["setting"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("mean kept KV cache (% of a full cache, measured)")
    ax.set_ylabel("mean score (± standard error)")
    ax.set_xlim(0, 105)
    ax.grid(alpha=0.3)
    if by_method:
        if many:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
