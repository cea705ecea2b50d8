"""Where members are evaluated: in this process (``local``), on Ray actors (``ray``) or in worker
processes on this machine (``processes``).

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
import multiprocessing
import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

from namm.evolution.config import ProcessesConfig, RayConfig
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

    affinity = True  # honours Job.affinity: actor k of this run takes jobs with affinity k first

    def run(self, jobs: list[Job], on_done: OnDone | None = None) -> list[list[PromptResult]]:
        ray = self.ray
        results: list[Any] = [None] * len(jobs)
        retries = [0] * len(jobs)
        pending = deque(range(len(jobs)))
        idle = list(self._alive())
        slot = {id(actor): k for k, actor in enumerate(idle)}  # a job's affinity names a slot
        in_flight: dict[Any, tuple[int, Any]] = {}
        while pending or in_flight:
            while pending and idle:
                actor = idle.pop(0)
                i = _take(pending, jobs, slot.get(id(actor)))
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


def _take(pending: deque, jobs: list[Job], slot: int | None) -> int:
    """The next job for the worker in ``slot``: the first pending one with that affinity, else the
    first pending one (a worker whose own jobs are done helps with the others)."""
    if slot is not None:
        for position, i in enumerate(pending):
            if jobs[i].affinity == slot:
                del pending[position]
                return i
    return pending.popleft()


# -- the processes backend: one Worker per spawned process, built on its first task ---------------

_PROCESS_WORKER: Any = None
_PROCESS_NORM_VERSION = 0


def _process_worker(spec: WorkerSpec, norm: tuple[int, Any]):
    """This process's worker, built once. The run's statistics travel with every task (they are
    small) as (version, statistics) and are set when the version changes: no broadcast needed."""
    global _PROCESS_WORKER, _PROCESS_NORM_VERSION
    if _PROCESS_WORKER is None:
        _PROCESS_WORKER = spec.build()
    version, stats = norm
    if version != _PROCESS_NORM_VERSION:
        _PROCESS_WORKER.set_calibration(stats)
        _PROCESS_NORM_VERSION = version
    return _PROCESS_WORKER


def _process_call(spec: WorkerSpec, norm: tuple[int, Any], method: str, args: tuple):
    return getattr(_process_worker(spec, norm), method)(*args)


class ProcessBackend:
    """Spread jobs over worker processes on this machine (``concurrent.futures``, spawned).

    Each process loads the model once, on its first job; jobs go to whichever process is free.
    When a process dies the pool is started afresh and the unfinished jobs re-run on it.
    """

    name = "processes"

    def __init__(self, spec: WorkerSpec, config: ProcessesConfig | None = None) -> None:
        self.spec = spec
        self.config = config or ProcessesConfig()
        self.workers = self.config.workers
        self.norm: tuple[int, Any] = (0, None)
        self.pool = self._pool()

    def _pool(self) -> ProcessPoolExecutor:
        # spawn: a forked child would share the parent's torch threads and CUDA state
        pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))
        # When a worker dies, Python 3.11's pool itself (its manager thread, before any except clause
        # here runs) joins the job queue's feeder thread, which may be blocked writing jobs into a pipe
        # that no live worker reads: the interpreter then hangs at exit. Never join it; a normal
        # shutdown still delivers every job, since it waits for the workers to read their stop signal.
        pool._call_queue.cancel_join_thread()
        return pool

    def _submit(self, method: str, *args):
        return self.pool.submit(_process_call, self.spec, self.norm, method, args)

    def _restart(self) -> None:
        self._abandon(self.pool)
        self.pool = self._pool()

    @staticmethod
    def _abandon(pool: ProcessPoolExecutor) -> None:
        """Drop a broken pool for good: end its processes and do not wait for it (its job queue is
        never joined: :meth:`_pool`)."""
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    def call(self, method: str, *args):
        """Run one worker method (build_pools, calibrate, num_params) in one process."""
        for _ in range(self.config.max_retries + 1):
            try:
                return self._submit(method, *args).result()
            except BrokenProcessPool:
                log.warning("a worker process died while running %s; starting a fresh pool", method)
                self._restart()
        raise RuntimeError(f"Worker processes kept dying while running {method}.")

    def set_calibration(self, norm) -> None:
        self.norm = (self.norm[0] + 1, norm)

    def run(self, jobs: list[Job], on_done: OnDone | None = None) -> list[list[PromptResult]]:
        results: list[Any] = [None] * len(jobs)
        todo = list(range(len(jobs)))
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                log.warning("a worker process died; re-running %d job(s) on a fresh pool", len(todo))
                self._restart()
            try:
                self._collect(jobs, todo, results, on_done)
            except BrokenProcessPool:
                todo = [i for i in todo if results[i] is None]
                continue
            return results
        raise RuntimeError(f"Worker processes kept dying; {len(todo)} job(s) did not finish.")

    def _collect(self, jobs: list[Job], todo: list[int], results: list[Any], on_done: OnDone | None) -> None:
        """Run jobs ``todo`` into ``results`` as they finish; BrokenProcessPool once all that could finish has."""
        futures = {self._submit("run", jobs[i]): i for i in todo}
        broken = False
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    results[futures[future]] = future.result()
                except BrokenProcessPool:
                    broken = True
                    continue
                if on_done:
                    on_done(futures[future])
        if broken:
            raise BrokenProcessPool("a worker process died")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def make_backend(kind: str, spec: WorkerSpec, ray_config: RayConfig | None = None,
                 processes: ProcessesConfig | None = None):
    """The backend named in the run config."""
    if kind == "local":
        return LocalBackend(spec)
    if kind == "ray":
        return RayBackend(spec, ray_config)
    if kind == "processes":
        return ProcessBackend(spec, processes)
    raise ValueError(f"Unknown backend {kind!r}; use 'local', 'ray' or 'processes'.")
