"""``namm eval --tasks rl:<task>``: normalised returns per method and setting with standard errors,
resumable, reports and plot, a NAMM row; the ``namm rl`` commands end to end on tiny settings."""

from __future__ import annotations

import json

import pytest
import torch
from rl_tiny import TINY_DATA

import namm.rl.evaluate as rl_evaluate
from namm.cli import main
from namm.evaluation import ROWS_FILE, EvalConfig, load_rows, run_evaluation
from namm.memory.model import NAMM, NAMMConfig
from namm.rl.envs import EVAL_SEED_BASE, make_env
from namm.rl.evaluate import eval_seeds
from namm.rl.model import load_dt
from namm.rl.rollout import reference_rollout


@pytest.fixture(scope="module")
def namm_dir(tmp_path_factory):
    """An uncalibrated threshold-mode NAMM with random parameters, evolved (so to speak) with chunk 16, delay 24."""
    namm = NAMM(NAMMConfig(chunk_size=16, delay=24, chat=False, evolved_on="tiny-llama"))
    params = torch.randn(namm.num_params, generator=torch.Generator().manual_seed(3)) * 0.3
    return str(namm.with_params(params).save_pretrained(tmp_path_factory.mktemp("namm") / "threshold"))


def test_rl_eval_end_to_end_with_a_namm_and_resume(tiny_dt_dir, namm_dir, tmp_path, monkeypatch):
    config = EvalConfig(model=str(tiny_dt_dir), tasks=["rl:halfcheetah"], methods=["full", "h2o", "streaming", "namm"],
                        keep_ratios=[0.5], limit=3, out=str(tmp_path), namm=namm_dir)
    rows = run_evaluation(config, progress=False)
    settings = sorted({(r["method"], r["setting"]) for r in rows})
    assert settings == [("full", "full"), ("h2o", "keep=0.5"), ("namm", "keep=0.5"), ("namm", "threshold"),
                        ("streaming", "keep=0.5")]
    assert len(rows) == 15 and {r["sample_id"] for r in rows} == {"episode-0", "episode-1", "episode-2"}
    dt = load_dt(tiny_dt_dir)
    env = make_env("halfcheetah", dt.config.horizon)
    for row in rows:
        assert row["task"] == "rl:halfcheetah" and row["length"] is None and row["steps"] == 24
        assert row["score"] == pytest.approx(dt.config.normalise(row["return"]) / 100)
        assert row["tokens"] == 3 * 24 - 1 and row["seed"] >= EVAL_SEED_BASE
        if row["method"] == "full":  # the full cache plays exactly the plain forward's episode
            assert row["return"] == pytest.approx(reference_rollout(dt, env, row["seed"]).ret, abs=1e-4)
            assert row["mean_fraction"] == 1.0
        else:
            assert row["kept_fraction"] < 1.0
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["chunk_size"], written["delay"]) == (16, 24)  # every method ran under the NAMM's schedule
    summary = {(s["method"], s["setting"]): s for s in json.loads((tmp_path / "results.json").read_text())["summary"]}
    full = [r["score"] for r in rows if r["method"] == "full"]
    assert summary[("full", "full")]["mean_score"] == pytest.approx(100 * sum(full) / 3)
    assert summary[("full", "full")]["se"] is not None and summary[("full", "full")]["n"] == [3]
    table = (tmp_path / "results.md").read_text()
    assert "| rl:halfcheetah |" in table and "normalised return" in table and "| namm | threshold |" in table
    assert (tmp_path / "results.png").stat().st_size > 0

    def refuse(*args, **kwargs):
        raise AssertionError("a finished episode was played again")

    monkeypatch.setattr(rl_evaluate, "rollout", refuse)
    again = run_evaluation(config, progress=False)
    assert sorted(json.dumps(r, sort_keys=True) for r in again) == sorted(json.dumps(r, sort_keys=True) for r in rows)
    assert len(load_rows(tmp_path / ROWS_FILE)) == 15


def test_evaluation_episodes_are_seeded_apart_from_the_data():
    assert [e.seed for e in eval_seeds(0, 3)] == [EVAL_SEED_BASE, EVAL_SEED_BASE + 1, EVAL_SEED_BASE + 2]
    assert eval_seeds(1, 1)[0].seed == EVAL_SEED_BASE + 100_000
    assert [e.id for e in eval_seeds(0, 2)] == ["episode-0", "episode-1"]


def test_rl_eval_refuses_what_it_cannot_run(tiny_dt_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="one per run"):
        EvalConfig(tasks=["rl:halfcheetah", "passkey"], methods=["full"])
    with pytest.raises(ValueError, match="one per run"):
        EvalConfig(tasks=["rl:halfcheetah", "rl:hopper"], methods=["full"])
    with pytest.raises(ValueError, match="Unknown control task"):
        EvalConfig(tasks=["rl:pong"], methods=["full"])
    with pytest.raises(ValueError, match="kvzip re-read"):
        EvalConfig(tasks=["rl:halfcheetah"], methods=["full", "kvzip"], keep_ratios=[0.5])
    with pytest.raises(ValueError, match="trained on 'halfcheetah'"):
        run_evaluation(EvalConfig(model=str(tiny_dt_dir), tasks=["rl:hopper"], methods=["full"], out=str(tmp_path)),
                       progress=False)
    monkeypatch.chdir(tmp_path)  # no runs/rl/walker2d/dt here
    with pytest.raises(FileNotFoundError, match="namm rl data --task walker2d"):
        run_evaluation(EvalConfig(tasks=["rl:walker2d"], methods=["full"], out=str(tmp_path / "e")), progress=False)


def test_the_commands_end_to_end(tmp_path, capsys):
    """namm rl data -> namm rl train -> namm eval --tasks rl:halfcheetah, as the README runs them."""
    data, model, out = tmp_path / "data", tmp_path / "dt", tmp_path / "eval"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_DATA.items()]
    assert main(["--quiet", "rl", "data", *flags, "--out", str(data)]) == 0
    assert "reference returns: expert" in capsys.readouterr().out
    assert main(["--quiet", "rl", "train", "--data", str(data), "--out", str(model), "--steps", "2", "--batch-size",
                 "2", "--hidden-size", "32", "--num-layers", "1", "--intermediate-size", "32"]) == 0
    assert "namm eval --tasks rl:halfcheetah" in capsys.readouterr().out
    assert main(["--quiet", "eval", "--tasks", "rl:halfcheetah", "--model", str(model), "--methods", "full,snapkv",
                 "--keep-ratios", "0.25", "--limit", "2", "--delay", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| snapkv | keep=0.25 |" in printed and "delay 16" in printed
    assert len(load_rows(out / ROWS_FILE)) == 4
    assert main(["--quiet", "eval", "--tasks", "rl:halfcheetah", "--model", str(model), "--methods", "kvzip",
                 "--keep-ratios", "0.25", "--out", str(out)]) == 1
    assert "token ids" in capsys.readouterr().err
