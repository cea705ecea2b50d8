"""The evaluation harness end to end on the tiny random model, resumability, tables, CLI flags."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest

from namm.cli import build_parser
from namm.commands.eval import config_from_args
from namm.engine import Engine
from namm.evaluation import (ROWS_FILE, EvalConfig, aggregate, load_rows, markdown_table, run_evaluation, summarize,
                             variants)
from namm.evaluation.plot import plot_score_vs_cache


def _config(out) -> EvalConfig:
    return EvalConfig(model="tiny-llama", tasks=["passkey"], lengths=[420], methods=["full", "streaming"],
                      keep_ratios=[0.5], limit=2, out=str(out), chunk_size=64, delay=128)


def test_end_to_end_writes_everything_and_resumes(tiny_llama, tmp_path, monkeypatch):
    model, tok = tiny_llama
    config = _config(tmp_path)
    rows = run_evaluation(config, model, tok, progress=False)
    assert len(rows) == 4  # 2 methods x 1 task x 1 length x 2 samples
    for name in ("rows.jsonl", "results.csv", "results.json", "results.md", "results.png", "config.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    by_method = {r["method"]: r for r in rows}
    assert by_method["full"]["mean_fraction"] == pytest.approx(1.0)
    assert by_method["streaming"]["mean_fraction"] < 0.9  # keep=0.5 really evicts
    assert all(0.0 <= r["score"] <= 1.0 and r["prompt_tokens"] <= 420 for r in rows)
    with (tmp_path / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert {(t["method"], t["setting"]) for t in table} == {("full", "full"), ("streaming", "keep=0.5")}
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert len(summary) == 2
    assert "| streaming | keep=0.5 |" in (tmp_path / "results.md").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished row was recomputed")

    monkeypatch.setattr(Engine, "generate", refuse)
    again = run_evaluation(config, model, tok, progress=False)
    assert sorted(json.dumps(r, sort_keys=True) for r in again) == sorted(json.dumps(r, sort_keys=True) for r in rows)
    assert len(load_rows(tmp_path / ROWS_FILE)) == 4


def test_resume_tolerates_a_cut_last_line(tmp_path):
    path = tmp_path / ROWS_FILE
    path.write_text('{"a": 1}\n{"b": ', encoding="utf-8")
    assert load_rows(path) == [{"a": 1}]


def test_variants_cover_methods_and_budgets():
    config = EvalConfig(tasks=["passkey"], methods=["full", "h2o", "namm"], keep_ratios=[0.25], budgets=[256])
    got = [(v.method, v.setting, v.kwargs) for v in variants(config)]
    assert got == [("full", "full", {}), ("h2o", "keep=0.25", {"keep_ratio": 0.25}),
                   ("h2o", "budget=256", {"budget": 256}), ("namm", "threshold", {"keep": "threshold"}),
                   ("namm", "cap=256", {"keep": "threshold", "max_cache": 256}),
                   ("namm", "keep=0.25", {"keep": "budget", "keep_ratio": 0.25})]
    with pytest.raises(ValueError, match="keep-ratios"):
        EvalConfig(tasks=["passkey"], methods=["h2o"])
    with pytest.raises(ValueError, match="Unknown task"):
        EvalConfig(tasks=["nope"], methods=["full"])


def test_aggregate_and_summary_by_hand():
    def row(method, task, score, mean_fraction, peak, peak_bytes=None):
        return {"method": method, "setting": "s", "task": task, "length": 100, "sample_id": "x", "score": score,
                "mean_fraction": mean_fraction, "peak_fraction": peak, "kv_bytes": 10, "tokens_per_s": 5.0,
                "peak_kv_bytes": peak_bytes, "kv_bytes_full": 200}

    rows = [row("m", "a", 1.0, 0.5, 0.6, 50), row("m", "a", 0.0, 0.3, 0.9, 120), row("m", "b", 0.5, 0.4, 0.4)]
    groups = aggregate(rows)
    assert [(g["task"], g["n"], g["score"], g["mean_fraction"], g["peak_fraction"], g["peak_kv"]) for g in groups] == [
        ("a", 2, 50.0, pytest.approx(0.4), 0.9, 0.6), ("b", 1, 50.0, 0.4, 0.4, None)]  # b: no peak bytes recorded
    (s,) = summarize(groups)
    assert s["mean_score"] == 50.0 and s["mean_fraction"] == pytest.approx(0.4) and s["peak_fraction"] == 0.9
    assert s["peak_kv"] == 0.6  # the largest peak KV over full-cache bytes


def test_standard_errors_by_hand():
    scores = {"a": [1.0, 0.0, 1.0, 1.0], "b": [0.2, 0.4, 0.9], "c": [0.5]}
    rows = [{"method": "m", "setting": "keep=0.5", "task": task, "length": 100, "sample_id": str(i), "score": x,
             "kept_fraction": 0.5, "mean_fraction": 0.6, "peak_fraction": 1.0, "peak_kv_bytes": 70,
             "kv_bytes_full": 100} for task, xs in scores.items() for i, x in enumerate(xs)]
    groups = aggregate(rows)
    se = {task: 100 * np.std(xs, ddof=1) / np.sqrt(len(xs)) for task, xs in scores.items() if len(xs) > 1}
    assert [(g["task"], g["n"]) for g in groups] == [("a", 4), ("b", 3), ("c", 1)]
    assert [g["se"] for g in groups[:2]] == [pytest.approx(se["a"]), pytest.approx(se["b"])]
    assert groups[2]["se"] is None  # one sample: no spread to estimate
    (s,) = summarize(groups[:2])
    assert s["mean_score"] == pytest.approx(100 * (np.mean(scores["a"]) + np.mean(scores["b"])) / 2)
    assert s["se"] == pytest.approx(np.sqrt(se["a"] ** 2 + se["b"] ** 2) / 2)  # mean of two independent cells
    assert (s["n"], s["samples"]) == ([3, 4], 7)
    assert summarize(groups)[0]["se"] is None
    table = markdown_table(groups[:2], [s], notes=["keep=r: a note"])
    assert f"| m | keep=0.5 | 75.0 ± {se['a']:.1f} | 50.0 ± {se['b']:.1f} | 62.5 ± {s['se']:.1f} | 3/4 | 50.0% | " \
           "60.0% | 70.0% | - |" in table
    assert "keep=r: a note" in table


def test_plot_draws_every_setting_with_its_error_bar(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn = []
    errorbar = Axes.errorbar

    def record(self, x, y, yerr=None, **kwargs):
        drawn.append((kwargs["label"], list(x), list(y), list(yerr)))
        return errorbar(self, x, y, yerr=yerr, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", record)
    summary = [{"method": "h2o", "setting": "keep=0.5", "mean_fraction": 0.6, "mean_score": 40.0, "se": 5.0},
               {"method": "h2o", "setting": "keep=0.25", "mean_fraction": 0.4, "mean_score": 20.0, "se": 4.0},
               {"method": "full", "setting": "full", "mean_fraction": 1.0, "mean_score": 70.0, "se": None}]
    plot_score_vs_cache(summary, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    assert drawn == [("full", [100.0], [70.0], [0.0]), ("h2o", [40.0, 60.0], [20.0, 40.0], [4.0, 5.0])]


def test_cli_flags_map_onto_the_config():
    args = build_parser().parse_args([
        "eval", "--model", "smollm2", "--tasks", "passkey,niah_multikey", "--lengths", "1024,2048",
        "--methods", "full,streaming,h2o,l2", "--keep-ratios", "0.25,0.5", "--limit", "5", "--quiet",
    ])
    config = config_from_args(args)
    assert config.tasks == ["passkey", "niah_multikey"] and config.lengths == [1024, 2048]
    assert config.methods == ["full", "streaming", "h2o", "l2"] and config.keep_ratios == [0.25, 0.5]
    assert config.limit == 5 and args.quiet and args.func is not None
    assert len(variants(config)) == 7


def test_report_only_runs_nothing_and_gives_no_mean_to_a_row_missing_a_cell(tiny_llama, tmp_path, monkeypatch):
    """``--report-only`` writes the tables from the finished rows (an interrupted run's) without
    running anything; a row missing a task's cell shows that cell as "-" and no mean."""
    model, tok = tiny_llama
    config = replace(_config(tmp_path), tasks=["passkey", "kv_retrieval"])
    rows = run_evaluation(config, model, tok, progress=False)
    assert len(rows) == 8
    kept = [r for r in load_rows(tmp_path / ROWS_FILE) if not (r["method"] == "streaming" and r["task"] == "kv_retrieval")]
    (tmp_path / ROWS_FILE).write_text("".join(json.dumps(r) + "\n" for r in kept))

    def no_runs(*args, **kwargs):
        raise AssertionError("report_only ran a row")

    monkeypatch.setattr("namm.evaluation.runner._run_missing", no_runs)
    produced = (tmp_path / "config.json").read_text()
    out = run_evaluation(replace(config, report_only=True), model, tok, progress=False)
    assert (tmp_path / "config.json").read_text() == produced  # still the config that produced the rows
    assert len(out) == 6 and len(load_rows(tmp_path / ROWS_FILE)) == 6
    table = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in (tmp_path / "results.md").read_text().splitlines()
             if line.startswith("| full") or line.startswith("| streaming")}
    assert table["streaming"][2] == "-" and table["streaming"][4] == "-"  # kv_retrieval column, then the mean
    assert table["full"][4] != "-"
    full = [r["score"] for r in out if r["method"] == "full"]
    assert table["full"][4].startswith(f"{100 * sum(full) / len(full):.1f}")
    summary = {s["method"]: s for s in json.loads((tmp_path / "results.json").read_text())["summary"]}
    assert summary["streaming"]["groups"] == 1 and summary["full"]["groups"] == 2


def test_shared_prefixes_give_the_same_rows_and_group_the_settings(tiny_llama, tmp_path):
    """Settings that share a prompt's prefix run one after another and score exactly as if unshared."""
    from namm.evaluation.runner import by_fork_key

    model, tok = tiny_llama
    base = EvalConfig(model="tiny-llama", tasks=["passkey"], lengths=[300], limit=2, chunk_size=64, delay=512,
                      methods=["h2o", "full", "snapkv", "expected-attention", "pyramidkv"], keep_ratios=[0.3, 0.6],
                      evict_at_prefill_end=True, evict_during_prefill=False)
    plan = by_fork_key(variants(base))
    assert [(v.method, v.setting) for v in plan] == [
        ("h2o", "keep=0.3"), ("h2o", "keep=0.6"), ("full", "full"),
        ("snapkv", "keep=0.3"), ("snapkv", "keep=0.6"), ("pyramidkv", "keep=0.3"), ("pyramidkv", "keep=0.6"),
        ("expected-attention", "keep=0.3"), ("expected-attention", "keep=0.6")]
    shared = run_evaluation(replace(base, out=str(tmp_path / "shared")), model, tok, progress=False)
    reused = [r["prefix_reused_s"] for r in shared]
    alone = run_evaluation(replace(base, out=str(tmp_path / "alone"), share_prefix=False), model, tok, progress=False)
    timing = ("tokens_per_s", "total_s", "prefix_reused_s")

    def strip(rows):
        return sorted(json.dumps({k: v for k, v in r.items() if k not in timing}, sort_keys=True) for r in rows)

    assert len(shared) == 2 * 9 and strip(shared) == strip(alone)
    # per sample: h2o, snapkv(+pyramidkv) read once and fork (1 + 3 of 4 settings), full and
    # expected-attention read their own
    assert sum(x > 0 for x in reused) == 2 * (1 + 3) and all(r["prefix_reused_s"] == 0.0 for r in alone)
