"""``namm evolve`` end to end on a tiny random Llama: outputs, checkpoints, refusal, kill -9 and resume."""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from namm.cli import main
from namm.memory.model import NAMM

torch.set_num_threads(1)


def read_log(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv") as f:
        return list(csv.DictReader(f))


def state(run: Path) -> dict:
    return pickle.loads((run / "state.pkl").read_bytes())


def trajectory(run: Path) -> list[tuple]:
    """Everything that must match between two runs with the same seed (not the timings)."""
    s = state(run)
    rows = [(r["generation"], r["stage"], tuple(r["fitness"]), r["kept_mean"], r["sigma"], r["eval_fitness"])
            for r in s["history"]]
    return rows + [tuple(pickle.loads(s["optimizer"]["es"])[0].mean)]


def test_evolve_writes_log_plot_and_loadable_checkpoints(tmp_path, tiny_dict, write_toml, capsys):
    cfg = write_toml(tmp_path / "run.toml", tiny_dict(tmp_path / "unused"))
    run = tmp_path / "run"
    assert main(["evolve", str(cfg), "--out", str(run)]) == 0
    err = capsys.readouterr().err
    assert "gen    2 [1] best" in err and "s/gen" in err  # the live display

    rows = read_log(run)
    assert [r["generation"] for r in rows] == ["0", "1", "2"]
    assert all(float(r["fitness_best"]) >= float(r["fitness_mean"]) >= float(r["fitness_worst"]) for r in rows)
    assert all(0 < float(r["kept_mean"]) <= 1 for r in rows)
    assert [bool(r["eval_fitness"]) for r in rows] == [False, True, True]  # every 2 and at the stage end
    assert (run / "fitness.png").read_bytes()[:4] == b"\x89PNG"

    s = state(run)
    assert s["generation"] == 3 and len(s["history"]) == 3
    mean = NAMM.from_pretrained(run / "mean")
    es_mean = pickle.loads(s["optimizer"]["es"])[0].mean
    np.testing.assert_allclose(mean.get_flat().double().numpy(), es_mean, rtol=1e-6, atol=1e-9)
    assert mean.norm is not None and mean.config.delay == 64 and mean.config.evolved_on == "tiny-llama"
    calibration = torch.load(run / "calibration.pt", weights_only=True)
    torch.testing.assert_close(mean.norm.mean, calibration["mean"])
    best = NAMM.from_pretrained(run / "best")
    np.testing.assert_allclose(best.get_flat().double().numpy(), s["best_eval"]["params"], rtol=1e-6, atol=1e-9)
    assert s["best_eval"]["fitness"] == pytest.approx(max(float(r["eval_fitness"]) for r in rows if r["eval_fitness"]))

    # an existing run is never overwritten without --resume
    assert main(["evolve", str(cfg), "--out", str(run), "--quiet"]) == 1
    assert "--resume" in capsys.readouterr().err
    # resuming with a different config is refused, naming what differs
    changed = write_toml(tmp_path / "changed.toml", tiny_dict(tmp_path / "unused", optimizer={"popsize": 6}))
    assert main(["evolve", str(changed), "--out", str(run), "--resume", "--quiet"]) == 1
    assert "['optimizer']" in capsys.readouterr().err
    # resuming a finished run changes nothing
    before = trajectory(run)
    assert main(["evolve", str(cfg), "--out", str(run), "--resume", "--quiet"]) == 0
    assert trajectory(run) == before
    # where it runs is not what it computes: other threads / backend settings may resume it
    elsewhere = write_toml(tmp_path / "threads.toml", tiny_dict(tmp_path / "unused", threads=1))
    assert main(["evolve", str(elsewhere), "--out", str(run), "--resume", "--quiet"]) == 0
    assert main(["evolve", str(cfg), "--out", str(run), "--resume", "--threads", "1", "--quiet"]) == 0
    assert json.loads((run / "config.json").read_text())["threads"] == 1
    assert trajectory(run) == before
    # the dtype changes what it computes: --dtype is recorded, and a resume must give the same
    assert main(["evolve", str(cfg), "--out", str(run), "--resume", "--dtype", "bfloat16", "--quiet"]) == 1
    assert "['dtype']" in capsys.readouterr().err


def test_evolve_dtype_override_is_recorded_and_needed_to_resume(tmp_path, tiny_dict, write_toml, capsys):
    data = tiny_dict(tmp_path / "unused", stages=[{"tasks": ["passkey"], "generations": 1}])
    assert data.get("dtype") in (None, "float32")
    cfg = write_toml(tmp_path / "run.toml", data)
    run = tmp_path / "run"
    assert main(["evolve", str(cfg), "--out", str(run), "--dtype", "bfloat16", "--quiet"]) == 0
    assert json.loads((run / "config.json").read_text())["dtype"] == "bfloat16"
    assert main(["evolve", str(cfg), "--out", str(run), "--resume", "--quiet"]) == 1
    assert "['dtype']" in capsys.readouterr().err
    assert main(["evolve", str(cfg), "--out", str(run), "--resume", "--dtype", "bfloat16", "--quiet"]) == 0


def test_metric_fitness_generates_and_scores(tmp_path, tiny_config):
    from namm.evolution.runner import EvolutionRun

    config = tiny_config(fitness={"mode": "metric"}, optimizer={"popsize": 2}, eval_interval=1,
                         stages=[{"tasks": ["passkey"], "generations": 1}])
    final = EvolutionRun(config).run()
    row = final["history"][0]
    # a random model never finds the passkey: no prompt counts (the full cache scores 0 on all of
    # them), so every member gets the finite no-evidence fitness 1, not 0 / 1e-7 or x / 1e-7
    assert row["fitness"] == [1.0, 1.0] and row["eval_fitness"] == 1.0
    assert row["member_score"] == [1.0, 1.0]
    refs = (Path(config.output_dir) / "reference_scores.json").read_text()
    assert '"score": 0.0' in refs and "tiny-llama|passkey|L320|passkey-train-L320-s0-" in refs


def test_kill_9_mid_run_then_resume_matches_uninterrupted(tmp_path, tiny_dict, write_toml):
    # two stages: the second adds a task and continues the optimiser and the generation count
    tasks = [{"name": "passkey", "length": 320, "prompts": 6}, {"name": "kv_retrieval", "length": 320, "prompts": 6}]
    stages = [{"tasks": ["passkey"], "generations": 3}, {"tasks": ["passkey", "kv_retrieval"], "generations": 2}]
    data = tiny_dict(tmp_path / "unused", tasks=tasks, stages=stages)
    cfg = write_toml(tmp_path / "run.toml", data)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(["evolve", str(cfg), "--out", str(straight), "--quiet"]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "namm.cli", "--quiet", "evolve", str(cfg), "--out", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (killed / "log.csv").exists() and len(read_log(killed)) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)  # in generation 2 (or writing generation 1's outputs)
    proc.wait()
    done = state(killed)["generation"]
    assert 2 <= done < 5  # no finished generation lost

    assert main(["evolve", str(cfg), "--out", str(killed), "--resume", "--quiet"]) == 0
    assert trajectory(killed) == trajectory(straight)
    rows = read_log(killed)
    assert [r["generation"] for r in rows] == [str(g) for g in range(5)]
    assert [r["stage"] for r in rows] == ["1", "1", "1", "2", "2"]
    assert rows[-1]["tasks"] == "passkey+kv_retrieval"
    assert NAMM.from_pretrained(killed / "mean").get_flat().equal(NAMM.from_pretrained(straight / "mean").get_flat())


def test_margin_fitness_runs_teacher_forced_and_caches_margins(tmp_path, tiny_config):
    from namm.evolution.runner import EvolutionRun

    config = tiny_config(fitness={"mode": "margin"}, optimizer={"popsize": 2}, eval_interval=1,
                         stages=[{"tasks": ["passkey"], "generations": 1}])
    final = EvolutionRun(config).run()
    row = final["history"][0]
    refs = json.loads((Path(config.output_dir) / "reference_scores.json").read_text())
    margins = [r["margins"] for r in refs.values()]
    # one margin per answer token (a passkey is several tokens), the full cache's own
    assert len(margins) == 2 + 2 and all(len(m) >= 2 for m in margins)
    # a random model's answer is never the argmax at every token: no prompt counts, fitness 1
    assert not any(min(m) > 0 for m in margins)
    assert row["fitness"] == [1.0, 1.0] and row["eval_fitness"] == 1.0


def test_budget_run_with_continuation_records_its_conditions(tmp_path, tiny_config):
    from namm.evolution.runner import EvolutionRun

    tasks = [{"name": "passkey", "length": 320, "prompts": 4},
             {"name": "continuation", "length": 320, "prompts": 4, "weight": 0.5,
              "options": {"continuation_tokens": 16}}]
    config = tiny_config(engine={"chunk_size": 32, "delay": 64, "evict_at_prefill_end": False},
                         namm={"keep": "budget", "keep_ratio": 0.5}, optimizer={"popsize": 3}, eval_interval=1,
                         tasks=tasks, stages=[{"tasks": ["passkey", "continuation"], "generations": 2}])
    final = EvolutionRun(config).run()
    run = Path(config.output_dir)
    for row in final["history"]:
        # budget mode: every member keeps exactly the same cache, so only the score ranks them
        assert len(set(row["member_kept"])) == 1 and 0.5 <= row["member_kept"][0] < 0.75
        assert len(row["member_score"]) == 3 and row["fitness"] == row["member_score"]
        assert len(set(row["fitness"])) == 3  # the dense objective separates the members
        assert set(row["eval_per_task"]) == {"passkey", "continuation"}
    logged = read_log(run)[-1]
    assert [float(x) for x in logged["member_kept"].split()] == pytest.approx(final["history"][-1]["member_kept"],
                                                                               rel=1e-3)
    assert len(logged["member_score"].split()) == 3

    mean = NAMM.from_pretrained(run / "mean")  # the conditions it was evolved under travel with it
    c = mean.config
    assert (c.keep, c.keep_ratio, c.chat, c.chunk_size, c.delay, c.evict_at_prefill_end, c.evict_during_prefill) == \
        ("budget", 0.5, False, 32, 64, False, True)
    refs = json.loads((run / "reference_scores.json").read_text())
    continuation = {k: v for k, v in refs.items() if "|continuation|" in k}
    assert any("continuation-train-L320-s0-" in k for k in continuation)
    assert any("continuation-test-L320-s1000000-" in k for k in continuation)  # the eval pool
    assert all(v["tokens"] == 16 and v["loglik"] < 0 for v in continuation.values())


def test_evolve_with_extra_inputs(tmp_path, tiny_dict, write_toml):
    """[namm] features.extras: calibration covers them and the saved NAMM has 28 inputs."""
    extras = ["attn_peak", "attn_entropy", "attn_var"]
    data = tiny_dict(tmp_path / "unused", namm={"features": {"extras": extras}}, optimizer={"popsize": 2},
                     stages=[{"tasks": ["passkey"], "generations": 1}])
    run = tmp_path / "run"
    assert main(["evolve", str(write_toml(tmp_path / "run.toml", data)), "--out", str(run)]) == 0
    mean = NAMM.from_pretrained(run / "mean")
    assert mean.config.features.extras == tuple(extras) and mean.num_params == 163 * 28 + 97
    assert mean.norm.n_bins == 17 + 3 and len(read_log(run)) == 1


def test_a_finished_run_resumes_longer_as_if_planned_so(tmp_path, tiny_dict, write_toml, capsys):
    # 2 generations, then resumed with 4 in its stage, then with a second stage added: the CMA-ES
    # trajectory is that of one 4 + 1 generation run (evaluations differ only where the stage ended)
    stages = lambda *gens: [{"tasks": ["passkey"], "generations": gens[0]}] + [  # noqa: E731
        {"tasks": ["passkey"], "generations": g, "name": "more"} for g in gens[1:]]
    short = write_toml(tmp_path / "short.toml", tiny_dict(tmp_path / "unused", stages=stages(2)))
    longer = write_toml(tmp_path / "longer.toml", tiny_dict(tmp_path / "unused", stages=stages(4)))
    added = write_toml(tmp_path / "added.toml", tiny_dict(tmp_path / "unused", stages=stages(4, 1)))
    run, straight = tmp_path / "run", tmp_path / "straight"
    assert main(["evolve", str(added), "--out", str(straight), "--quiet"]) == 0
    assert main(["evolve", str(short), "--out", str(run), "--quiet"]) == 0
    assert state(run)["generation"] == 2

    assert main(["evolve", str(longer), "--out", str(run), "--resume", "--quiet"]) == 0
    assert state(run)["generation"] == 4
    assert main(["evolve", str(added), "--out", str(run), "--resume", "--quiet"]) == 0
    assert [r["generation"] for r in read_log(run)] == [str(g) for g in range(5)]
    assert [r["stage"] for r in read_log(run)] == ["1", "1", "1", "1", "2"]
    cma = lambda t: [row[:5] for row in t[:-1]] + [t[-1]]  # noqa: E731
    assert cma(trajectory(run)) == cma(trajectory(straight))
    assert NAMM.from_pretrained(run / "mean").get_flat().equal(NAMM.from_pretrained(straight / "mean").get_flat())
    # the run folder now describes the longer run, and says where it was extended
    assert json.loads((run / "config.json").read_text())["stages"][-1]["name"] == "more"
    assert "name = \"more\"" in (run / "config.toml").read_text()
    sessions = [json.loads(line) for line in (run / "sessions.jsonl").read_text().splitlines()]
    assert [(s["generation"], s["generations"], s.get("extended_from")) for s in sessions] == [
        (0, 2, None), (2, 4, 2), (4, 5, 4)]

    # shortening it, or changing a stage it has run, is refused and says what may change
    for i, bad in enumerate([stages(3), [{"tasks": ["passkey"], "generations": 4, "name": "renamed"}]]):
        cfg = write_toml(tmp_path / f"bad{i}.toml", tiny_dict(tmp_path / "unused", stages=bad))
        assert main(["evolve", str(cfg), "--out", str(run), "--resume", "--quiet"]) == 1
        assert "may only be extended" in capsys.readouterr().err
    assert state(run)["generation"] == 5
