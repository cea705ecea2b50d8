"""Turn evaluation rows into tables: ``results.csv`` (one line per method, setting, task and
length), ``results.json`` (the same plus a per-method summary) and ``results.md`` (a score table
with standard errors and the measured cache fractions), and the plot ``results.png``.

Standard errors: a cell's is that of its mean over samples, std(ddof=1) / sqrt(n); the mean
score of a method and setting is the mean of its cells (every task and length weighs the same)
and its standard error sqrt(sum of the cells' SE^2) / cells (cells independent)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from math import sqrt
from statistics import mean, stdev
from typing import Any

__all__ = ["aggregate", "summarize", "write_reports", "markdown_table"]

GROUP_FIELDS = ("method", "setting", "task", "length")


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return mean(present) if present else None


def _se(scores: list[float]) -> float | None:
    """100 x the standard error of the mean of ``scores`` (None for a single sample)."""
    return 100 * stdev(scores) / sqrt(len(scores)) if len(scores) > 1 else None


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (method, setting, task, length): score is 100 x the mean sample score, se
    its standard error (100 x std(ddof=1) / sqrt(n); None when n = 1); kept_fraction / mean_fraction the means of the samples' final / time-averaged kept fractions,
    peak_fraction their maximum; peak_kv the largest peak KV bytes over the full cache's bytes
    (a full cache peaks at its end), over the samples."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[f] for f in GROUP_FIELDS)].append(row)
    out = []
    for key, members in groups.items():
        out.append({
            **dict(zip(GROUP_FIELDS, key)),
            "n": len(members),
            "score": 100 * mean(r["score"] for r in members),
            "se": _se([r["score"] for r in members]),
            "kept_fraction": _mean([r.get("kept_fraction") for r in members]),
            "mean_fraction": _mean([r["mean_fraction"] for r in members]),
            "peak_fraction": max(r["peak_fraction"] for r in members),
            "peak_kv": _max([_peak_kv(r) for r in members]),
            "kv_bytes": _mean([r.get("kv_bytes") for r in members]),
            "tokens_per_s": _mean([r.get("tokens_per_s") for r in members]),
        })
    return sorted(out, key=lambda g: (g["method"], _setting_order(g["setting"]), g["task"], g["length"] or 0))


def _peak_kv(row: dict[str, Any]) -> float | None:
    """Peak KV bytes of a row as a share of the full cache's (rows written before peak bytes were
    recorded have none)."""
    peak, full = row.get("peak_kv_bytes"), row.get("kv_bytes_full")
    return peak / full if peak and full else None


def _max(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def summarize(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (method, setting): the mean over its task/length groups (each weighs the
    same), ``se`` its standard error sqrt(sum se^2) / groups (None if a group has one sample),
    ``n`` the sorted distinct samples per group, ``samples`` their total."""
    by_variant: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for group in groups:
        by_variant[(group["method"], group["setting"])].append(group)
    out = []
    for (method, setting), members in by_variant.items():
        out.append({
            "method": method, "setting": setting, "groups": len(members),
            "mean_score": mean(g["score"] for g in members),
            "se": _pooled_se([g["se"] for g in members]),
            "n": sorted({g["n"] for g in members}), "samples": sum(g["n"] for g in members),
            "kept_fraction": _mean([g["kept_fraction"] for g in members]),
            "mean_fraction": _mean([g["mean_fraction"] for g in members]),
            "peak_fraction": max(g["peak_fraction"] for g in members),
            "peak_kv": _max([g.get("peak_kv") for g in members]),
            "tokens_per_s": _mean([g["tokens_per_s"] for g in members]),
        })
    return sorted(out, key=lambda s: (s["method"], _setting_order(s["setting"])))


def _pooled_se(ses: list[float | None]) -> float | None:
    return None if any(se is None for se in ses) else sqrt(sum(se * se for se in ses)) / len(ses)


def _setting_order(setting: str) -> tuple[int, str, float]:
    """full / threshold first, then each kind (cap, keep, budget) by size; "keep=0.312 (namm)"
    sorts among the keep ratios."""
    kind, _, value = setting.partition("=")
    try:
        return (0 if kind in ("full", "threshold") else 1, kind, float(value.split(" ")[0] or 0))
    except ValueError:
        return (2, setting, 0.0)


def _column(group: dict[str, Any]) -> str:
    return group["task"] if group["length"] is None else f"{group['task']}@{group['length']}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _score(score: float, se: float | None) -> str:
    return f"{score:.1f}" if se is None else f"{score:.1f} ± {se:.1f}"


def markdown_table(groups: list[dict[str, Any]], summary: list[dict[str, Any]], title: str = "",
                   conditions: str = "", notes: list[str] | None = None) -> str:
    """Scores ± standard error per task (columns) for each method and setting, with the samples
    per cell (n), mean score ± SE, final, mean and peak kept-cache fraction (of tokens seen,
    measured) and throughput; ``conditions`` says what ran, ``notes`` explain settings."""
    columns = sorted({_column(g) for g in groups})
    cell = {(g["method"], g["setting"], _column(g)): g for g in groups}
    header = ["method", "setting", *columns, "mean score", "n", "final cache", "mean cache", "peak KV", "tokens/s"]
    lines = [f"# {title}\n" if title else "", "| " + " | ".join(header) + " |",
             "|" + "|".join([" --- "] * 2 + [" ---: "] * (len(header) - 2)) + "|"]
    for s in summary:
        scores = []
        for column in columns:
            g = cell.get((s["method"], s["setting"], column))
            scores.append("-" if g is None else _score(g["score"], g["se"]))
        tps = "-" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:.0f}"
        complete = s["groups"] == len(columns)  # a mean over fewer cells would not compare with the others
        lines.append("| " + " | ".join([s["method"], s["setting"], *scores,
                                        _score(s["mean_score"], s["se"]) if complete else "-",
                                        "/".join(map(str, s["n"])), _pct(s["kept_fraction"]),
                                        _pct(s["mean_fraction"]), _pct(s.get("peak_kv")), tps]) + " |")
    lines.append("")
    lines.append("Scores are 100 x the mean metric over the n samples of each cell, ± its standard error "
                 "(std(ddof=1) / sqrt(n)); the mean score is the mean of a row's cells (each task and length "
                 "weighs the same), ± sqrt(sum of the cells' SE^2) / cells; a row missing a cell has no mean (-). Cache fractions are the KV cache the "
                 "engine measured, averaged over the row's samples: final = kept at the end, as a share of the "
                 "tokens seen; mean = the cache each token was computed against, as a share of what a full "
                 "cache held at that moment; peak KV = the most KV-cache bytes held at any moment (just before an "
                 "eviction step), as a share of the full cache's at the end of the same prompt (the maximum over "
                 "samples). The kept share of tokens seen peaks at 100% for every method (the first chunk is read "
                 "whole), so it is in the JSON (peak_fraction) but not in the table.")
    lines += [line for note in notes or [] for line in ("", note)]
    if conditions:
        lines += ["", f"Every method ran under: {conditions}."]
    return "\n".join(line for line in lines if line is not None) + "\n"


def write_reports(rows: list[dict[str, Any]], out_dir: str | Path, title: str = "",
                  conditions: str = "", notes: list[str] | None = None) -> dict[str, Path]:
    """Write results.csv, results.json, results.md and results.png into ``out_dir``; ``conditions``
    (the schedule and prompt format every method ran under) and ``notes`` (what the settings
    mean) go into the JSON and Markdown."""
    out_dir = Path(out_dir)
    groups = aggregate(rows)
    summary = summarize(groups)
    paths = {name: out_dir / f"results.{name}" for name in ("csv", "json", "md", "png")}
    fields = [*GROUP_FIELDS, "n", "score", "se", "kept_fraction", "mean_fraction", "peak_fraction", "peak_kv",
              "kv_bytes", "tokens_per_s"]
    with paths["csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(groups)
    paths["json"].write_text(json.dumps({"title": title, "conditions": conditions, "notes": notes or [],
                                         "rows": len(rows), "groups": groups, "summary": summary}, indent=2),
                             encoding="utf-8")
    paths["md"].write_text(markdown_table(groups, summary, title, conditions, notes), encoding="utf-8")
    from namm.evaluation.plot import plot_score_vs_cache

    plot_score_vs_cache(summary, paths["png"], title=title)
    return paths
