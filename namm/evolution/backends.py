"""Where members are evaluated: in this process (``local``) or on Ray actors (``ray``).

A backend turns a list of :class:`~namm.evolution.fitness.Job` into their per-prompt results, in
job order. Every job is a pure function of its parameters and prompts (greedy decoding, frozen
statistics), so which worker runs it does not change the result: the same seed gives the same
fitness on both backends.

The Ray backend keeps one actor per model replica (each holds a loaded model; on a GPU cluster
give each actor one GPU). Jobs go to whichever actor is idle. When an actor dies, its job is
re-run on another one; a fresh actor is started only when none is left.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from typing import Any, Callable

from namm.evolution.config import RayConfig
from namm.evolution.fitness import Job, PromptResult, WorkerSpec

log = logging.getLogger(__name__)

OnDone = Callable[[int], None]  # called with a job's index when it finishes


class LocalBackend:
    """Evaluate jobs one after the other in this process."""

    name = "local"

    def __init__(self, spec: WorkerSpec) -> None:
        self.worker = spec.build()

    workers = 1

    def call(self, method: str, *args):
        """Run one of the worker's methods (build_pools, calibrate, num_params)."""
        return getattr(self.worker, method)(*args)

    def set_calibration(self, norm) -> None:
        self.worker.set_calibration(norm)

    def run(self, jobs: list[Job], on_done: OnDone | None = None) -> list[list[PromptResult]]:
        results = []
        for i, job in enumerate(jobs):
            results.append(self.worker.run(job))
            if on_done:
                on_done(i)
        return results

    def close(self) -> None:
        pass


class _WorkerActor:
    """The Ray actor: one loaded model, a NAMM template and the run's statistics."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.worker = spec.build()

    def call(self, method: str, *args):
        return getattr(self.worker, method)(*args)

    def set_calibration(self, norm) -> None:
        self.worker.set_calibration(norm)

    def run(self, job: Job) -> list[PromptResult]:
        return self.worker.run(job)


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("backend = \"ray\" needs Ray: pip install 'namm[ray]' (or: pip install ray).") from exc
    return ray


@contextlib.contextmanager
def _worker_niceness(config: RayConfig):
    """``RAY_worker_niceness`` for the local Ray instance ``ray.init`` starts inside the block
    (its raylet reads the environment once), then the environment as it was."""
    key = "RAY_worker_niceness"
    if config.address or config.worker_niceness is None or key in os.environ:
        yield
        return
    os.environ[key] = str(int(config.worker_niceness))
    try:
        yield
    finally:
        del os.environ[key]


class RayBackend:
    """Spread jobs over Ray actors, one per model replica; re-run the jobs of dead actors."""

    name = "ray"

    def __init__(self, spec: WorkerSpec, config: RayConfig | None = None) -> None:
        ray = _import_ray()
        self.ray = ray
        self.config = config or RayConfig()
        if self.config.actors < 1:
            raise ValueError(f"ray.actors must be >= 1, got {self.config.actors}.")
        if not ray.is_initialized():
            with _worker_niceness(self.config):
                ray.init(address=self.config.address or None, include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
        self.spec = spec
        self.norm: Any = None
        self._actor_class = ray.remote(_WorkerActor).options(
            num_cpus=self.config.cpus_per_actor, num_gpus=self.config.gpus_per_actor, max_restarts=0)
        self.actors = [self._start_actor() for _ in range(self.config.actors)]

    def _start_actor(self):
        actor = self._actor_class.remote(self.spec)
        if self.norm is not None:
            actor.set_calibration.remote(self.norm)  # actor calls run in order: set before any job
        return actor

    @property
    def workers(self) -> int:
        return len(self.actors)

    def set_calibration(self, norm) -> None:
        self.norm = norm
        for actor in list(self.actors):
            try:
                self.ray.get(actor.set_calibration.remote(norm))
            except self.ray.exceptions.RayActorError:
                self._drop(actor)

    def call(self, method: str, *args):
        """Run one worker method on one actor, moving on to the next actor if it dies."""
        for _ in range(self.config.max_retries + 1):
            actor = self._alive()[0]
            try:
                return self.ray.get(actor.call.remote(method, *args))
            except self.ray.exceptions.RayActorError:
                self._drop(actor)
        raise RuntimeError(f"Ray actors kept dying while running {method}; see the Ray logs.")

    def run(self, jobs: list[Job], on_done: OnDone | None = None) -> list[list[PromptResult]]:
        ray = self.ray
        results: list[Any] = [None] * len(jobs)
        retries = [0] * len(jobs)
        pending = deque(range(len(jobs)))
        idle = list(self._alive())
        in_flight: dict[Any, tuple[int, Any]] = {}
        while pending or in_flight:
            while pending and idle:
                i, actor = pending.popleft(), idle.pop(0)
                in_flight[actor.run.remote(jobs[i])] = (i, actor)
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            i, actor = in_flight.pop(ready[0])
            try:
                results[i] = ray.get(ready[0])
            except ray.exceptions.RayActorError:
                retries[i] += 1
                if retries[i] > self.config.max_retries:
                    raise RuntimeError(f"Job {jobs[i].key} failed on {retries[i]} dead actors; giving up.") from None
                log.warning("a Ray actor died; re-running its job (member %d) on another actor", jobs[i].key)
                self._drop(actor)
                if actor in idle:
                    idle.remove(actor)
                if not idle and not in_flight:
                    idle.append(self._alive()[0])
                pending.appendleft(i)
                continue
            idle.append(actor)
            if on_done:
                on_done(i)
        return results

    def _drop(self, actor) -> None:
        if actor in self.actors:
            self.actors.remove(actor)

    def _alive(self) -> list:
        """The live actors; a fresh one is started when none is left."""
        if not self.actors:
            log.warning("no Ray actor left; starting a fresh one")
            self.actors.append(self._start_actor())
        return list(self.actors)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


def make_backend(kind: str, spec: WorkerSpec, ray_config: RayConfig | None = None):
    """The backend named in the run config."""
    if kind == "local":
        return LocalBackend(spec)
    if kind == "ray":
        return RayBackend(spec, ray_config)
    raise ValueError(f"Unknown backend {kind!r}; use 'local' or 'ray'.")
