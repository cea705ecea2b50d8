"""`namm eval` with a NAMM: both keep modes whatever it was evolved in, and --match-namm (the
baselines at the NAMM's measured kept fraction), on the tiny random model."""

from __future__ import annotations

import json
from statistics import mean

import pytest
import torch

from namm.cli import build_parser
from namm.commands.eval import config_from_args
from namm.engine import Engine, EngineConfig
from namm.evaluation import ROWS_FILE, EvalConfig, load_rows, run_evaluation, variants
from namm.evaluation.runner import NAMM_THRESHOLD, matched_setting
from namm.memory.calibration import calibrate
from namm.memory.model import NAMM, NAMMConfig

SCHEDULE = dict(chunk_size=64, delay=128)


@pytest.fixture(scope="module")
def namm_dir(tiny_llama, tmp_path_factory) -> str:
    """A calibrated threshold-mode NAMM with random parameters: it keeps ~13% of a 420-token
    prompt, a little differently per prompt."""
    model, tok = tiny_llama
    engine = Engine(model, tok, config=EngineConfig(**SCHEDULE))
    prompts = [torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(2)]
    namm = calibrate(engine, NAMM(NAMMConfig(**SCHEDULE, chat=False, evolved_on="tiny-llama")), prompts,
                     max_new_tokens=2, progress=False)
    params = torch.randn(namm.num_params, generator=torch.Generator().manual_seed(3)) * 0.3
    return str(namm.with_params(params).save_pretrained(tmp_path_factory.mktemp("namm") / "threshold"))


def _settings(config: EvalConfig, namm: NAMMConfig | None, matched: float | None = None) -> list[tuple]:
    return [(v.method, v.setting, v.kwargs, v.keep_ratio, v.budget) for v in variants(config, namm, matched)]


def test_a_namm_runs_in_both_keep_modes_whatever_it_was_evolved_in():
    config = EvalConfig(tasks=["passkey"], methods=["full", "h2o", "namm"], keep_ratios=[0.25, 0.3], budgets=[256],
                        namm="dir")
    threshold = [("namm", "threshold", {"namm": "dir", "keep": "threshold"}, None, None),
                 ("namm", "cap=256", {"namm": "dir", "keep": "threshold", "max_cache": 256}, None, 256)]
    baselines = [("full", "full", {}, None, None), ("h2o", "keep=0.25", {"keep_ratio": 0.25}, 0.25, None),
                 ("h2o", "keep=0.3", {"keep_ratio": 0.3}, 0.3, None), ("h2o", "budget=256", {"budget": 256}, None, 256)]

    def budget_mode(r):
        return ("namm", f"keep={r:g}", {"namm": "dir", "keep": "budget", "keep_ratio": r}, r, None)

    evolved_threshold = _settings(config, NAMMConfig())
    assert evolved_threshold == baselines + threshold + [budget_mode(0.25), budget_mode(0.3)]
    # budget-evolved: its own keep ratio first, not repeated
    evolved_budget = _settings(config, NAMMConfig(keep="budget", keep_ratio=0.3))
    assert evolved_budget == baselines + threshold + [budget_mode(0.3), budget_mode(0.25)]
    matched = _settings(config, NAMMConfig(), matched=0.312)
    assert matched == baselines + [("h2o", "keep=0.312 (namm)", {"keep_ratio": 0.312}, 0.312, None)] + threshold \
        + [budget_mode(0.25), budget_mode(0.3)]


def test_match_namm_needs_namm_among_the_methods():
    with pytest.raises(ValueError, match="add namm to --methods"):
        EvalConfig(tasks=["passkey"], methods=["full", "h2o"], keep_ratios=[0.5], match_namm=True)
    EvalConfig(tasks=["passkey"], methods=["h2o", "namm"], match_namm=True)  # the matched ratio sizes h2o
    parser = build_parser()
    args = parser.parse_args(["eval", "--methods", "full,namm,h2o", "--match-namm", "--keep-ratios", "0.25"])
    assert config_from_args(args).match_namm is True
    with pytest.raises(ValueError, match="add namm"):
        config_from_args(parser.parse_args(["eval", "--methods", "h2o", "--match-namm", "--keep-ratios", "0.25"]))
    assert config_from_args(parser.parse_args(["eval"])).match_namm is False


def test_match_namm_measures_the_ratio_from_the_rows_and_resumes(tiny_llama, namm_dir, tmp_path, monkeypatch):
    model, tok = tiny_llama
    config = EvalConfig(model="tiny-llama", tasks=["passkey"], lengths=[420], methods=["namm", "streaming"],
                        keep_ratios=[0.5], limit=3, out=str(tmp_path), namm=namm_dir, match_namm=True)
    rows = run_evaluation(config, model, tok, progress=False)
    assert len(rows) == 12  # namm threshold, namm keep=0.5, streaming keep=0.5, streaming matched x 3 samples
    written = load_rows(tmp_path / ROWS_FILE)
    assert [(r["method"], r["setting"]) for r in written[:3]] == [("namm", NAMM_THRESHOLD)] * 3  # measured first
    fractions = [r["kept_fraction"] for r in written[:3]]
    matched = round(mean(fractions), 3)
    assert 0.05 < matched < 0.5 and len(set(fractions)) > 1  # a real, sample-dependent emergent size
    baseline = [r for r in rows if r["setting"] == matched_setting(matched)]
    assert len(baseline) == 3 and all(r["method"] == "streaming" and r["keep_ratio"] == matched for r in baseline)
    # really that size at its evictions; the final fraction also holds the tokens decoded since the last one
    tail = mean(r["new_tokens"] / (r["prompt_tokens"] + r["new_tokens"]) for r in baseline)
    assert mean(r["kept_fraction"] for r in baseline) == pytest.approx(matched + (1 - matched) * tail, abs=0.005)
    budget = [r for r in rows if r["method"] == "namm" and r["setting"] == "keep=0.5"]
    assert mean(r["kept_fraction"] for r in budget) == pytest.approx(0.5, abs=0.02)  # budget mode honoured
    report = json.loads((tmp_path / "results.json").read_text())
    assert any(f"keep={matched:g} (namm)" in note and "3 samples" in note for note in report["notes"])
    assert f"| streaming | keep={matched:g} (namm) |" in (tmp_path / "results.md").read_text()

    # resume from the NAMM rows alone: the same ratio, only the other rows are generated
    (tmp_path / ROWS_FILE).write_text("".join(json.dumps(r) + "\n" for r in written[:3]), encoding="utf-8")
    calls = []
    generate = Engine.generate

    def counting(self, *args, **kwargs):
        calls.append(kwargs["policy"].name)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", counting)
    again = run_evaluation(config, model, tok, progress=False)
    assert calls.count("namm") == 3 and calls.count("streaming") == 6  # namm keep=0.5 and both streaming
    assert {r["setting"] for r in again} == {r["setting"] for r in rows}

    def refuse(*args, **kwargs):
        raise AssertionError("a finished row was recomputed")

    monkeypatch.setattr(Engine, "generate", refuse)
    third = run_evaluation(config, model, tok, progress=False)
    assert len(third) == 12 and len(load_rows(tmp_path / ROWS_FILE)) == 12


def test_namm_per_head_adds_its_threshold_rows(tiny_llama, namm_dir, tmp_path):
    """--namm-per-head: one more NAMM setting, its threshold rule per KV head; off by default."""
    parser = build_parser()
    assert config_from_args(parser.parse_args(["eval", "--methods", "namm"])).namm_per_head is False
    config = config_from_args(parser.parse_args(["eval", "--methods", "namm", "--namm-per-head", "--namm", namm_dir,
                                                 "--limit", "1", "--lengths", "420", "--out", str(tmp_path)]))
    assert [v.setting for v in variants(config, NAMMConfig())] == [NAMM_THRESHOLD, "threshold per head"]
    assert variants(config, NAMMConfig())[1].kwargs == {"namm": namm_dir, "keep": "threshold", "per_head": True}
    with pytest.raises(ValueError, match="add namm to --methods"):
        EvalConfig(tasks=["passkey"], methods=["h2o"], keep_ratios=[0.5], namm_per_head=True)
    model, tok = tiny_llama
    run_evaluation(config, model, tok, progress=False)
    rows = {r["setting"]: r for r in load_rows(tmp_path / ROWS_FILE)}
    assert set(rows) == {NAMM_THRESHOLD, "threshold per head"}
    # the histories part after the first eviction step, so neither rule keeps fewer in general
    assert rows["threshold per head"]["kept_fraction"] != rows[NAMM_THRESHOLD]["kept_fraction"]
    assert all(0 < r["kept_fraction"] < 0.5 for r in rows.values())
