"""The run's plot: fitness and kept cache over generations (matplotlib, Agg, no display needed)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from namm.evolution.checkpoint import atomic_write_bytes


def plot_history(history: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Two panels over generations: fitness (best, population mean, evaluated mean) and kept cache."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    gens = [row["generation"] for row in history]
    evals = [(row["generation"], row["eval_fitness"], row["eval_kept"]) for row in history
             if row.get("eval_fitness") is not None]
    fig, (ax_fit, ax_kept) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax_fit.plot(gens, [row["fitness_best"] for row in history], label="best member", lw=1, color="C0")
    ax_fit.plot(gens, [row["fitness_mean"] for row in history], label="population mean", lw=1.5, color="C1")
    ax_kept.plot(gens, [row["kept_mean"] for row in history], label="population mean", lw=1.5, color="C1")
    if evals:
        ax_fit.plot([e[0] for e in evals], [e[1] for e in evals], "o-", label="CMA mean (eval)", ms=4, color="C2")
        ax_kept.plot([e[0] for e in evals], [e[2] for e in evals], "o-", label="CMA mean (eval)", ms=4, color="C2")
    for row, prev in zip(history[1:], history[:-1]):
        if row["stage"] != prev["stage"]:  # stage boundaries
            for ax in (ax_fit, ax_kept):
                ax.axvline(row["generation"] - 0.5, color="grey", ls=":", lw=1)
    ax_fit.axhline(1.0, color="black", lw=0.5, alpha=0.5)
    ax_fit.set_ylabel("fitness (1 = full cache)")
    ax_kept.set_ylabel("kept cache fraction")
    ax_kept.set_xlabel("generation")
    ax_kept.set_ylim(0, 1.05)
    ax_kept.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_fit, ax_kept):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        ax_fit.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
