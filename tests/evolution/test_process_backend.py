"""The processes backend (spawned worker processes, no Ray) gives the local backend's fitness for
the same seed, and re-runs the jobs of a worker process that died."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from namm.evolution import checkpoint as ckpt
from namm.evolution.backends import LocalBackend, ProcessBackend, make_backend
from namm.evolution.config import ProcessesConfig, RunConfig
from namm.evolution.fitness import Job
from namm.evolution.runner import EvolutionRun


def values(results):
    return [[(r.loglik, r.tokens, r.kept) for r in rs] for rs in results]


def test_processes_run_matches_local_run(tmp_path, tiny_config):
    stages = [{"tasks": ["passkey"], "generations": 2}]
    local = EvolutionRun(tiny_config(stages=stages, output_dir=str(tmp_path / "local"))).run()
    config = tiny_config(stages=stages, output_dir=str(tmp_path / "proc"), backend="processes",
                         processes={"workers": 2})
    spawned = EvolutionRun(config).run()
    assert len(spawned["history"]) == 2
    for a, b in zip(local["history"], spawned["history"], strict=True):
        assert a["fitness"] == b["fitness"]
        assert a["eval_fitness"] == b["eval_fitness"]
    assert (tmp_path / "local" / "calibration.pt").read_bytes() == (tmp_path / "proc" / "calibration.pt").read_bytes()


def test_jobs_of_a_killed_worker_process_are_rerun(tiny_config):
    config = tiny_config(stages=[{"tasks": ["passkey"], "generations": 1}])
    spec = EvolutionRun(config)._worker_spec()
    local = LocalBackend(spec)
    pools = local.call("build_pools", config)
    norm = local.call("calibrate", pools.calibration_batch())
    local.set_calibration(norm)
    prompts = pools.eval_batch(["passkey"])[:2]
    rng = np.random.default_rng(0)
    n = local.call("num_params")
    jobs = [Job(key=k, params=0.05 * rng.standard_normal(n), prompts=prompts) for k in range(4)]
    expected = values(local.run(jobs))

    backend = make_backend("processes", spec, processes=ProcessesConfig(workers=2))
    assert isinstance(backend, ProcessBackend)
    try:
        backend.set_calibration(norm)
        assert values(backend.run(jobs)) == expected
        for pid in list(backend.pool._processes):  # both workers die between two generations
            os.kill(pid, signal.SIGKILL)
        finished = []
        assert values(backend.run(jobs, on_done=finished.append)) == expected
        assert sorted(finished) == [0, 1, 2, 3]
    finally:
        backend.close()


def test_workers_must_be_positive():
    with pytest.raises(ValueError, match="processes.workers"):
        ProcessesConfig(workers=0)


def test_a_local_run_resumes_on_worker_processes(tmp_path, tiny_dict, write_toml):
    """backend and workers are execution settings: `namm evolve --resume --backend processes` goes on
    from a local run's checkpoint exactly as the local run would have."""
    from namm.cli import main

    stages = [{"tasks": ["passkey"], "generations": 2}]
    whole = EvolutionRun(RunConfig.from_dict(tiny_dict(tmp_path / "whole", stages=stages))).run()

    class Stop(Exception):
        pass

    def stop_after_first(kind, data):
        if kind == "generation":
            raise Stop  # after generation 0's checkpoint: a run stopped between generations

    run = tmp_path / "split"
    with pytest.raises(Stop):
        EvolutionRun(RunConfig.from_dict(tiny_dict(run, stages=stages)), on_event=stop_after_first).run()
    toml = write_toml(tmp_path / "run.toml", tiny_dict(run, stages=stages))
    assert main(["evolve", str(toml), "--resume", "--workers", "2", "--quiet"]) == 1  # local runs one worker
    assert main(["evolve", str(toml), "--resume", "--backend", "processes", "--workers", "2", "--quiet"]) == 0
    state = ckpt.load_state(run)
    assert len(state["history"]) == 2
    sessions = [json.loads(line) for line in (run / ckpt.SESSIONS_FILE).read_text().splitlines()]
    assert [(s["generation"], s["backend"], s["workers"]) for s in sessions] == [(0, "local", 1), (1, "processes", 2)]
    assert [h["fitness"] for h in state["history"]] == [h["fitness"] for h in whole["history"]]


EXIT_AFTER_A_DEAD_WORKER = """
import os, signal, time, types
from namm.evolution.backends import ProcessBackend

pool = ProcessBackend._pool(types.SimpleNamespace(workers=1))
busy = pool.submit(time.sleep, 60)
while not pool._processes or not busy.running():
    time.sleep(0.05)
queued = [pool.submit(len, b"x" * 2**20) for _ in range(4)]  # more than the job pipe holds
time.sleep(0.5)
for pid in list(pool._processes):
    os.kill(pid, signal.SIGKILL)
try:
    busy.result(timeout=30)
except Exception as exc:
    print(type(exc).__name__)
"""


def test_the_interpreter_exits_after_a_worker_died_with_jobs_in_the_pipe():
    """Python 3.11's pool joins its job queue's feeder thread when a worker dies; blocked on a full
    pipe that nobody reads, that join hung the interpreter at exit (and a CI run with it). Without
    the fix this script hangs on Python 3.11.2 (the CI machine's); 3.11.7 happens not to."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", EXIT_AFTER_A_DEAD_WORKER], capture_output=True, text=True,
                          timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "BrokenProcessPool"
