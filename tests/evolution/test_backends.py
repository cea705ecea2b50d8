"""Local and Ray backends give the same fitness for the same seed; a killed actor's jobs are re-run.

Ray runs as a real local instance (2 CPUs, one tiny-model actor per CPU).
"""

from __future__ import annotations

import numpy as np
import pytest

from namm.evolution.backends import LocalBackend, RayBackend
from namm.evolution.config import RayConfig
from namm.evolution.fitness import Job
from namm.evolution.runner import EvolutionRun

ray = pytest.importorskip("ray")


def values(results):
    return [[(r.loglik, r.tokens, r.kept) for r in rs] for rs in results]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_run_matches_local_run(tmp_path, tiny_config, local_ray):
    stages = [{"tasks": ["passkey"], "generations": 2}]
    local = EvolutionRun(tiny_config(stages=stages, output_dir=str(tmp_path / "local"))).run()
    remote = EvolutionRun(tiny_config(stages=stages, output_dir=str(tmp_path / "ray"), backend="ray",
                                      ray={"actors": 2})).run()
    for a, b in zip(local["history"], remote["history"], strict=True):
        assert a["fitness"] == b["fitness"]
        assert a["eval_fitness"] == b["eval_fitness"]
    assert (tmp_path / "local" / "calibration.pt").read_bytes() == (tmp_path / "ray" / "calibration.pt").read_bytes()


def test_killed_actor_jobs_are_rerun_elsewhere(tiny_config, local_ray):
    config = tiny_config()
    spec = EvolutionRun(config)._worker_spec()
    local = LocalBackend(spec)
    pools = local.call("build_pools", config)
    norm = local.call("calibrate", pools.calibration_batch())
    local.set_calibration(norm)
    rng = np.random.default_rng(0)
    prompts = pools.generation_batch(0, ["passkey"])
    jobs = [Job(i, 0.065 * rng.standard_normal(local.call("num_params")), prompts) for i in range(4)]
    expected = local.run(jobs)

    backend = RayBackend(spec, RayConfig(actors=2))
    backend.set_calibration(norm)
    victim = backend.actors[0]

    def kill_once(i: int) -> None:
        if victim in backend.actors:
            ray.kill(victim)  # dies idle or in the middle of its next job

    results = backend.run(jobs, on_done=kill_once)
    assert victim not in backend.actors and len(backend.actors) == 1
    assert values(results) == values(expected)
    backend.close()


def test_local_ray_workers_run_at_the_configured_niceness(tiny_config):
    """Ray's own default worker niceness is 15; a Ray instance the backend starts uses the config's."""
    import os

    if ray.is_initialized():
        ray.shutdown()
    spec = EvolutionRun(tiny_config())._worker_spec()
    backend = RayBackend(spec, RayConfig(actors=1, worker_niceness=3))
    try:
        assert "RAY_worker_niceness" not in os.environ  # restored after ray.init
        niceness = ray.get(ray.remote(lambda: os.nice(0)).remote())
        assert niceness == min(os.nice(0) + 3, 19)  # Ray adds it to the niceness of the process
    finally:
        backend.close()
        ray.shutdown()


def test_worker_niceness_is_checked():
    with pytest.raises(ValueError, match="worker_niceness"):
        RayConfig(worker_niceness=25)
    assert RayConfig(worker_niceness=None).worker_niceness is None
