"""Evaluation: methods x tasks x lengths x budgets on one model, resumable, with tables and a plot.

``run_evaluation(EvalConfig(...))`` runs what is missing from ``<out>/rows.jsonl`` and writes
``results.csv``, ``results.json``, ``results.md`` and ``results.png``; ``namm eval`` is its CLI.
"""

from __future__ import annotations

from namm.evaluation.report import aggregate, markdown_table, summarize, write_reports
from namm.evaluation.runner import ROWS_FILE, EvalConfig, Variant, load_rows, run_evaluation, variants

__all__ = [
    "ROWS_FILE", "EvalConfig", "Variant", "aggregate", "load_rows", "markdown_table", "run_evaluation",
    "summarize", "variants", "write_reports",
]
