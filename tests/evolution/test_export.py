"""Shipping an evolved NAMM: ``namm export`` writes a run's NAMM with a provenance that checks out
against the run folder, and the shipped NAMM is what ``--policy namm`` runs without ``--namm``."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch

from namm.cli import main
from namm.evolution.export import export_run
from namm.evolution.runner import EvolutionRun
from namm.memory.model import NAMM, NAMMConfig, available_pretrained, default_pretrained, read_provenance
from namm.policies.namm import NAMMPolicy

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = {"passkey": 2, "kv_retrieval": 1}  # tiny-test.toml's samples_per_task, and the override below
PROMPT = "the quick brown fox jumps over the lazy dog " * 12


@pytest.fixture
def run(tiny_config) -> Path:
    """A finished tiny run: 2 generations on passkey, then 1 on passkey + kv_retrieval; the mean is
    evaluated after generations 1 and 2 (every 2 and at each stage end)."""
    tasks = [{"name": "passkey", "length": 320, "prompts": 6},
             {"name": "kv_retrieval", "length": 320, "prompts": 6, "samples": SAMPLES["kv_retrieval"]}]
    stages = [{"name": "retrieval", "tasks": ["passkey"], "generations": 2},
              {"name": "all", "tasks": ["passkey", "kv_retrieval"], "generations": 1}]
    config = tiny_config(tasks=tasks, stages=stages, optimizer={"popsize": 3}, eval_interval=2)
    EvolutionRun(config).run()
    return Path(config.output_dir)


@pytest.fixture
def shipped(tmp_path, monkeypatch) -> Path:
    """An empty ``namm/pretrained`` standing in for the package's."""
    folder = tmp_path / "pretrained"
    folder.mkdir()
    monkeypatch.setattr("namm.memory.model.PRETRAINED_DIR", folder)
    return folder


def log_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def run_state(run: Path) -> dict:
    return pickle.loads((run / "state.pkl").read_bytes())


def ship_other(folder: Path, name: str = "a-smollm2") -> Path:
    """A (zero, keep-everything) NAMM evolved on smollm2, sorted before the tiny run's export."""
    dest = NAMM(NAMMConfig(evolved_on="smollm2")).save_pretrained(folder / name)
    (dest / "provenance.json").write_text(json.dumps({"model": "smollm2"}))
    return dest


def test_export_writes_the_mean_and_a_provenance_that_checks_out(run, tmp_path):
    dest = export_run(run, tmp_path / "ship")
    p = json.loads((dest / "provenance.json").read_text())
    rows = log_rows(run)
    config_bytes = (run / "config.json").read_bytes()
    config = json.loads(config_bytes)

    assert (p["model"], p["dtype"], p["which"], p["popsize"]) == ("tiny-llama", config["dtype"], "mean", 3)
    assert p["config_sha256"] == hashlib.sha256(config_bytes).hexdigest() and p["config"] == config
    assert p["generations"] == len(rows) == 3 and p["generation"] == 2
    assert p["stages"] == [{"stage": 1, "name": "retrieval", "tasks": ["passkey"], "generations": 2, "planned": 2},
                           {"stage": 2, "name": "all", "tasks": ["passkey", "kv_retrieval"], "generations": 1,
                            "planned": 1}]
    # members x prompts of each logged generation: 3 x 2, 3 x 2, 3 x (2 + 1)
    members = sum(len(r["member_fitness"].split()) * sum(SAMPLES[t] for t in r["tasks"].split("+")) for r in rows)
    assert p["member_evaluations"] == members == 21
    # the mean on eval_samples_per_task (2) prompts per task after generations 1 (1 task) and 2 (2 tasks)
    assert p["mean_evaluations"] == sum(2 * len(r["tasks"].split("+")) for r in rows if r["eval_fitness"]) == 6
    assert p["compute_hours"] == pytest.approx(sum(float(r["seconds"]) for r in rows) / 3600, rel=1e-9)
    evals = [(int(r["generation"]), float(r["eval_fitness"])) for r in rows if r["eval_fitness"]]
    assert [g for g, _ in evals] == [1, 2]
    assert p["eval_last"] == {"generation": 2, "fitness": evals[-1][1]}
    best = run_state(run)["best_eval"]
    assert p["eval_best"]["generation"] == best["generation"]
    assert p["eval_best"]["fitness"] == pytest.approx(best["fitness"], rel=1e-9)
    assert p["hardware"]["cpus"] == os.cpu_count() and p["hardware"]["torch"] == torch.__version__
    # one session (the run was started once, not resumed): where its generations ran
    [session] = p["sessions"]
    assert (session["generation"], session["backend"], session["workers"], session["device"]) == (0, "local", 1, "cpu")
    assert session["hardware"] == p["hardware"]
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert p["git_commit"] == (git.stdout.strip() if git.returncode == 0 else None)
    assert abs(datetime.now(timezone.utc) - datetime.fromisoformat(p["date"])) < timedelta(minutes=10)
    assert read_provenance(dest) == p

    shipped = NAMM.from_pretrained(dest)  # the run's CMA mean, its statistics and its conditions
    es_mean = pickle.loads(run_state(run)["optimizer"]["es"])[0].mean
    np.testing.assert_allclose(shipped.get_flat().double().numpy(), es_mean, rtol=1e-6, atol=1e-9)
    mean = NAMM.from_pretrained(run / "mean")
    assert torch.equal(shipped.get_flat(), mean.get_flat()) and torch.equal(shipped.norm.mean, mean.norm.mean)
    assert shipped.config == mean.config and shipped.config.delay == 64
    assert sorted(f.name for f in dest.iterdir()) == ["config.json", "namm.safetensors", "provenance.json"]
    assert not list(tmp_path.glob(".ship*"))  # no temp folder left behind


def test_export_best_is_the_best_evaluated_mean(run, tmp_path):
    dest = export_run(run, tmp_path / "best", which="best")
    best = run_state(run)["best_eval"]
    p = read_provenance(dest)
    assert p["which"] == "best" and p["generation"] == best["generation"] == p["eval_best"]["generation"]
    np.testing.assert_allclose(NAMM.from_pretrained(dest).get_flat().double().numpy(), best["params"],
                               rtol=1e-6, atol=1e-9)


def test_export_refuses_what_it_cannot_ship(run, tmp_path):
    with pytest.raises(ValueError, match="not a `namm evolve` run folder"):
        export_run(tmp_path / "nowhere", tmp_path / "a")
    with pytest.raises(ValueError, match="which must be one of"):
        export_run(run, tmp_path / "a", which="worst")
    with pytest.raises(ValueError, match="is the run folder"):
        export_run(run, run, force=True)
    with pytest.raises(ValueError, match="is the run folder"):
        export_run(run, run / "mean", force=True)

    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="pass --force"):
        export_run(run, dest)
    assert (dest / "notes.txt").read_text() == "mine"  # untouched
    export_run(run, dest, force=True)
    assert sorted(f.name for f in dest.iterdir()) == ["config.json", "namm.safetensors", "provenance.json"]

    no_best = tmp_path / "no-best"
    shutil.copytree(run, no_best)
    shutil.rmtree(no_best / "best")
    with pytest.raises(ValueError, match="no best/ NAMM"):
        export_run(no_best, tmp_path / "b", which="best")
    rows = (no_best / "log.csv").read_text().splitlines()
    (no_best / "log.csv").write_text(rows[0] + "\n")  # the header only: no generation finished
    with pytest.raises(ValueError, match="not finished a generation"):
        export_run(no_best, tmp_path / "b")


def test_default_pretrained_picks_by_model_then_falls_back(run, shipped):
    assert available_pretrained() == [] and default_pretrained("tiny-llama") is None
    with pytest.raises(ValueError, match="needs a NAMM and none is shipped"):
        NAMMPolicy()

    ship_other(shipped)
    export_run(run, shipped / "tiny")
    NAMM().save_pretrained(shipped / "z-bare")  # no provenance.json
    assert available_pretrained() == ["a-smollm2", "tiny", "z-bare"]
    assert default_pretrained("tiny-llama") == "tiny"
    assert default_pretrained("SmolLM2") == "a-smollm2"
    assert default_pretrained("gemma3-270m") == default_pretrained(None) == "a-smollm2"  # zero-shot: the first
    assert read_provenance("z-bare") is None and read_provenance("tiny")["model"] == "tiny-llama"
    policy = NAMMPolicy()
    assert policy.source == "a-smollm2" and policy.namm.config.evolved_on == "smollm2"


def test_cli_export(run, tmp_path, capsys):
    dest = tmp_path / "ship"
    assert main(["export", str(run), "--to", str(dest)]) == 0
    assert "evolved on tiny-llama, 3 generations" in capsys.readouterr().out
    assert main(["export", str(run), "--to", str(dest), "--which", "best"]) == 1
    assert "pass --force" in capsys.readouterr().err
    assert main(["export", str(run), "--to", str(dest), "--which", "best", "--force"]) == 0
    assert read_provenance(dest)["which"] == "best"


def generate(capsys, model: str, *argv: str) -> str:
    assert main(["--quiet", "generate", "--model", model, "--no-chat", PROMPT, "--max-new-tokens", "4",
                 "--policy", "namm", *argv]) == 0
    return capsys.readouterr().out


def test_policy_namm_without_namm_runs_the_shipped_one(run, shipped, capsys):
    assert main(["generate", "--model", "tiny-llama", "hello", "--policy", "namm"]) == 1
    assert "namm export RUN_DIR --to namm/pretrained/NAME" in capsys.readouterr().err

    ship_other(shipped)
    export_run(run, shipped / "tiny")
    out = json.loads(generate(capsys, "tiny-llama", "--json"))
    assert out["namm"] == "tiny"  # the one evolved on this model, not the first
    assert (out["conditions"]["chunk_size"], out["conditions"]["delay"]) == (32, 64)  # its recorded schedule
    assert out["memory"]["evictions"] >= 8
    # another model: the first shipped NAMM, zero-shot, said in the report
    assert "namm             a-smollm2 (evolved on smollm2, zero-shot)" in generate(capsys, "tiny-qwen2")
    assert "namm             tiny\n" in generate(capsys, "tiny-llama")


def test_export_fits_the_threshold_on_the_runs_training_prompts(run, tmp_path, capsys):
    """--fit-threshold RATIO: the shipped NAMM's threshold mode keeps RATIO of the run's training
    prompts (checked by running them again), the provenance records the fit, nothing else changes."""
    from namm.engine import Engine, EngineConfig
    from namm.evolution.config import RunConfig
    from namm.evolution.prompts import build_pool
    from namm.models import load_model

    dest = tmp_path / "ship"
    assert main(["export", str(run), "--to", str(dest), "--fit-threshold", "0.5", "--fit-samples", "1",
                 "--quiet"]) == 0
    fit = read_provenance(dest)["threshold_fit"]
    assert "threshold mode: threshold" in capsys.readouterr().out
    shipped, source = NAMM.from_pretrained(dest), NAMM.from_pretrained(run / "mean")
    assert torch.equal(shipped.get_flat(), source.get_flat()) and shipped.config.keep == source.config.keep
    assert shipped.config.threshold == fit["threshold"] and abs(fit["kept"] - 0.5) <= 0.05
    assert (fit["tasks"], fit["split"], fit["prompts"]) == (["passkey", "kv_retrieval"], "train", 2)

    config = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    model, tok = load_model(config.model, dtype=config.dtype)
    engine = Engine(model, tok, config=EngineConfig(**shipped.config.schedule))
    prompts = [p.prompt for t in config.tasks for p in build_pool(t, tok, config.seed, n=1)]
    kept = [engine.generate(p, max_new_tokens=1, policy=NAMMPolicy(namm=shipped, keep="threshold"))
            .report.prefill.kept_fraction for p in prompts]
    assert sum(kept) / len(kept) == pytest.approx(fit["kept"], abs=1e-9)
    # no ratio: a NAMM evolved in threshold mode has a trained threshold, so the CLI asks for one
    if source.config.keep != "budget":
        assert main(["export", str(run), "--to", str(tmp_path / "other"), "--fit-threshold"]) == 1
        assert "give a RATIO" in capsys.readouterr().err


def test_provenance_follows_the_init_chain(run, tiny_config, tmp_path):
    """A run started from another run's mean (``init``) records that run's summary, and the compute
    hours add up along the chain."""
    config = tiny_config(init=str(run / "mean"), stages=[{"tasks": ["passkey"], "generations": 1}],
                         eval_interval=0, output_dir=str(tmp_path / "second"))
    EvolutionRun(config).run()
    p = json.loads((export_run(tmp_path / "second", tmp_path / "ship") / "provenance.json").read_text())
    first = json.loads((export_run(run, tmp_path / "ship-first") / "provenance.json").read_text())
    init = p["init"]
    assert init["path"] == str(run / "mean") and init["run_dir"] == str(run) and init["which"] == "mean"
    assert (init["generations"], init["config_sha256"]) == (3, first["config_sha256"]) and init["init"] is None
    assert init["compute_hours"] == pytest.approx(first["compute_hours"]) and first["compute_hours"] > 0
    assert p["total_compute_hours"] == pytest.approx(p["compute_hours"] + first["compute_hours"])
    assert first["init"] is None and first["total_compute_hours"] == pytest.approx(first["compute_hours"])


def test_training_curve_follows_the_init_chain(run, tiny_config, tmp_path):
    """``chain_history`` puts the init run's generations (up to the one handed on) before the run's own,
    counted on one axis, and ``plot_chain`` draws them."""
    from namm.evolution.plot import chain_history, plot_chain

    best = json.loads((export_run(run, tmp_path / "ship-best", which="best") / "provenance.json").read_text())
    config = tiny_config(init=str(run / "best"), stages=[{"tasks": ["passkey"], "generations": 2}],
                         eval_interval=0, output_dir=str(tmp_path / "second"))
    EvolutionRun(config).run()
    rows = chain_history(tmp_path / "second")
    first = log_rows(run)
    cut = best["generation"]  # best/ is the best evaluated mean: the chain continues from there
    assert cut == max((float(x["eval_fitness"]), int(x["generation"])) for x in first if x["eval_fitness"])[1]
    assert [(r["run"], r["generation"]) for r in rows] == (
        [(str(run), g) for g in range(cut + 1)] + [(str(tmp_path / "second"), g) for g in range(2)])
    assert [r["step"] for r in rows] == list(range(cut + 3))
    assert rows[0]["fitness_mean"] == pytest.approx(float(first[0]["fitness_mean"]))
    assert [r["eval_fitness"] is not None for r in rows[: cut + 1]] == [bool(x["eval_fitness"]) for x in first[: cut + 1]]
    plot_chain(rows, tmp_path / "curve.png", baselines={"H2O": 0.4}, marker=rows[-1]["step"])
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a run without init is its own chain
    assert [r["generation"] for r in chain_history(run)] == [int(x["generation"]) for x in first]


def test_evaluate_a_namm_on_the_runs_eval_prompts(run, tmp_path):
    """``namm evolve CONFIG --out RUN --evaluate NAMM`` scores a NAMM as the run scores its mean:
    mean/ (the CMA mean evaluated after the last generation) gets the fitness that evaluation
    logged, on the last stage's tasks, and the run is left as it was."""
    state, log = (run / "state.pkl").read_bytes(), (run / "log.csv").read_bytes()
    last = run_state(run)["history"][-1]
    assert last["eval_fitness"] is not None
    result = EvolutionRun(load_run_config(run)).evaluate(run / "mean")
    assert result["stage"] == 2 and result["tasks"] == ["passkey", "kv_retrieval"]
    assert result["fitness"] == pytest.approx(last["eval_fitness"], abs=1e-6)
    assert result["kept"] == pytest.approx(last["eval_kept"], abs=1e-6)
    assert (run / "state.pkl").read_bytes() == state and (run / "log.csv").read_bytes() == log
    other = NAMM.from_pretrained(run / "mean")
    other.norm.mean += 1.0
    other.save_pretrained(tmp_path / "other-norm")
    with pytest.raises(ValueError, match="normalisation statistics are not this run's"):
        EvolutionRun(load_run_config(run)).evaluate(tmp_path / "other-norm")


def load_run_config(run: Path):
    from namm.evolution.config import RunConfig

    return RunConfig.from_dict(json.loads((run / "config.json").read_text()))
