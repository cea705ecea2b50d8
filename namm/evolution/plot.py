"""The run's plot: fitness and kept cache over generations (matplotlib, Agg, no display needed)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from namm.evolution.checkpoint import atomic_write_bytes


def _save(fig, path: str | Path) -> None:
    """Lay out, render to PNG and write ``path`` atomically; close the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


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
    _save(fig, path)


def chain_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """A run's log rows preceded by those of the runs it started from (its ``init`` chain), oldest first.

    Each row of ``log.csv`` gains ``run`` (its folder), ``step`` (the generation counted along the whole
    chain) and floats for the numeric columns; an init run contributes its generations up to the one
    whose NAMM was handed on (its ``mean/`` at the last generation, its ``best/`` at the best evaluation).
    """
    from namm.evolution.export import _read_run, provenance

    chain: list[tuple[Path, int | None]] = []  # (run folder, last generation used by the next run)
    run, cut = Path(run_dir), None
    seen: set[Path] = set()
    while True:
        if run.resolve() in seen:
            raise ValueError(f"The init chain of {str(run_dir)!r} loops back to {str(run)!r}.")
        seen.add(run.resolve())
        chain.append((run, cut))
        init = provenance(run).get("init")
        if not init or "run_dir" not in init:
            break
        run, cut = Path(init["run_dir"]), int(init["generation"])
    rows: list[dict[str, Any]] = []
    for run, cut in reversed(chain):
        _, log = _read_run(run)
        for row in log:
            if cut is not None and int(row["generation"]) > cut:
                break
            out: dict[str, Any] = {"run": str(run), "step": len(rows), "stage": int(row["stage"]),
                                   "tasks": row["tasks"], "generation": int(row["generation"])}
            for key in ("fitness_best", "fitness_mean", "kept_mean", "sigma", "seconds", "eval_fitness", "eval_kept"):
                out[key] = float(row[key]) if row.get(key) not in (None, "") else None
            rows.append(out)
    return rows


def plot_chain(rows: list[dict[str, Any]], path: str | Path, title: str = "",
               baselines: dict[str, float] | None = None, marker: int | None = None) -> None:
    """The training curve along an init chain (:func:`chain_history`): population mean and the CMA mean's
    evaluations against the generation counted over the whole chain, one colour per run, dotted lines
    where the run or its task set changes (evaluations on different task sets do not compare), optional
    horizontal ``baselines`` (name -> fitness on the last segment's tasks) and a ``marker`` step (the
    shipped generation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    runs = list(dict.fromkeys(r["run"] for r in rows))
    for i, run in enumerate(runs):
        seg = [r for r in rows if r["run"] == run]
        name = Path(run).name
        ax.plot([r["step"] for r in seg], [r["fitness_mean"] for r in seg], lw=1, alpha=0.45, color=f"C{i}",
                label=f"{name}: population mean")
        ev = [r for r in seg if r["eval_fitness"] is not None]
        ax.plot([r["step"] for r in ev], [r["eval_fitness"] for r in ev], "o-", ms=4, lw=1.8, color=f"C{i}",
                label=f"{name}: CMA mean, eval prompts")
    for prev, row in zip(rows[:-1], rows[1:]):
        if row["run"] != prev["run"] or row["tasks"] != prev["tasks"]:
            ax.axvline(row["step"] - 0.5, color="grey", ls=":", lw=1)
        if row["tasks"] != prev["tasks"]:
            ax.annotate(row["tasks"].replace("+", ", "), (row["step"], 1.02), fontsize=6, color="grey",
                        rotation=90, va="top", ha="left", xytext=(2, 0), textcoords="offset points")
    if rows:
        ax.annotate(rows[0]["tasks"].replace("+", ", "), (0, 1.02), fontsize=6, color="grey", rotation=90,
                    va="top", ha="left", xytext=(2, 0), textcoords="offset points")
    start = rows[-1]["step"] if rows else 0
    while start > 0 and rows[start - 1]["tasks"] == rows[-1]["tasks"]:
        start -= 1
    for j, (name, value) in enumerate((baselines or {}).items()):
        ax.hlines(value, start, rows[-1]["step"] if rows else 1, colors="black", linestyles=["--", "-.", ":"][j % 3],
                  lw=1, label=f"{name} (same fitness, last task set)")
    if marker is not None:
        ax.axvline(marker, color="red", lw=1, alpha=0.6, label="shipped")
    ax.set_xlabel("generation (counted over the whole chain)")
    ax.set_ylabel("fitness (1 = full cache)")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower center", ncol=2)
    if title:
        ax.set_title(title)
    _save(fig, path)
