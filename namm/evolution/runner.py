"""An evolution run: calibration, stages of ask / evaluate / tell, evaluation, checkpoints, logs.

One generation::

    prompts  = the generation's draw (same for every member, fresh every generation)
    refs     = full-cache results on those prompts (cached on disk, computed once)
    members  = es.ask()                          # (popsize, n_params)
    fitness  = backend.run(one job per member) -> member_fitness(...)
    es.tell(fitness)
    every eval_interval generations (and at the end of a stage): evaluate the CMA mean
    checkpoint (state.pkl, atomically), then mean/, best/, log.csv, fitness.png

Stages run in order, each continuing the previous one's optimiser state; generation numbers
continue across stages. A resumed run reloads ``state.pkl`` and continues with the very
generation that was interrupted: its prompts and members are the same as the uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from namm.evolution import checkpoint as ckpt
from namm.evolution.backends import make_backend
from namm.evolution.config import BACKENDS, RunConfig, load_config
from namm.evolution.fitness import (Job, MemberFitness, PromptResult, WorkerSpec, build_namm, member_fitness,
                                   merge_results, split_jobs)
from namm.evolution.optimizer import CMAES
from namm.evolution.plot import plot_history
from namm.evolution.prompts import Prompt, PromptPools, ReferenceScores
from namm.memory.model import lift_params
from namm.models import resolve_device

log = logging.getLogger(__name__)

OnEvent = Callable[[str, dict[str, Any]], None]  # (kind, data): progress for a display

# where and how the run executes, not what it computes (same seed, same result on every backend):
# a run may resume with other values, e.g. on a bigger machine or with Ray
EXECUTION_KEYS = frozenset({"output_dir", "backend", "ray", "processes", "threads"})


def extends_stages(saved: list[dict[str, Any]], current: list[dict[str, Any]]) -> bool:
    """Whether ``current`` is ``saved`` run longer: the same stages, the last one with at least as
    many generations, then any stages added after it."""
    if len(current) < len(saved) or not saved:
        return False
    last = len(saved) - 1
    same_before = current[:last] == saved[:last]
    grown = ({k: v for k, v in current[last].items() if k != "generations"}
             == {k: v for k, v in saved[last].items() if k != "generations"}
             and current[last]["generations"] >= saved[last]["generations"])
    return same_before and grown


class EvolutionRun:
    """Run (or resume) the evolution described by ``config`` in ``config.output_dir``.

    resume:   continue the run in the folder (start it if the folder has no checkpoint yet);
              without it an existing, non-empty folder is an error.
    on_event: called with ("start" | "calibrating" | "references" | "member" | "generation" |
              "done", data) so a display can follow the run.
    """

    def __init__(self, config: RunConfig, resume: bool = False, on_event: OnEvent | None = None,
                 config_text: str | None = None) -> None:
        self.config = config
        self.run_dir = Path(config.output_dir)
        self.resume = resume
        self.on_event = on_event or (lambda kind, data: None)
        self.config_text = config_text
        self.backend: Any = None
        self.extended: tuple[int, int] | None = None  # (saved, new) total generations when resumed longer

    # -- setup ----------------------------------------------------------------------------------

    def _prepare_dir(self) -> None:
        d = self.run_dir
        if d.exists() and not d.is_dir():
            raise ValueError(f"Output {str(d)!r} exists and is not a folder.")
        if d.is_dir() and any(d.iterdir()):
            if not self.resume:
                raise ValueError(f"Run folder {str(d)!r} already exists and is not empty; pass --resume to continue "
                                 f"it, or --out NEW_DIR to start another run.")
            self._check_same_config()
        d.mkdir(parents=True, exist_ok=True)
        resolved = json.dumps(self.config.to_dict(), indent=2, sort_keys=True, default=str)
        ckpt.atomic_write_text(d / "config.json", resolved + "\n")
        if self.config_text is not None and (self.extended or not (d / "config.toml").exists()):
            ckpt.atomic_write_text(d / "config.toml", self.config_text)

    def _check_same_config(self) -> None:
        saved_path = self.run_dir / "config.json"
        if not saved_path.exists():
            return
        saved = json.loads(saved_path.read_text())
        current = json.loads(json.dumps(self.config.to_dict(), sort_keys=True, default=str))
        differ = sorted(k for k in set(saved) | set(current)
                        if k not in EXECUTION_KEYS and saved.get(k) != current.get(k))
        if differ == ["stages"] and extends_stages(saved["stages"], current["stages"]):
            # more generations in the last stage, or stages added after it: the run goes on from its
            # checkpoint as if the longer schedule had been there from the start
            self.extended = (sum(s["generations"] for s in saved["stages"]),
                             sum(s["generations"] for s in current["stages"]))
            return
        if differ:
            hint = (" (a run may only be extended: more generations in its last stage, or stages added after it)"
                    if differ == ["stages"] else "")
            raise ValueError(f"--resume with a config that differs from the run's saved config in {differ}{hint}; "
                             f"resume with {saved_path} or start a new run with --out.")

    def _worker_spec(self) -> WorkerSpec:
        c = self.config
        return WorkerSpec(model=c.model, dtype=c.dtype, device=c.device, engine=c.engine, namm=c.namm_config(),
                          threads=c.threads)

    # -- the run --------------------------------------------------------------------------------

    def run(self, backend: Any = None) -> dict[str, Any]:
        """Run to the last generation of the last stage; returns the final checkpoint state."""
        self._prepare_dir()
        spec = self._worker_spec()
        self.backend = backend or make_backend(self.config.backend, spec, self.config.ray, self.config.processes)
        try:
            return self._run(spec)
        finally:
            if backend is None:
                self.backend.close()

    def _run(self, spec: WorkerSpec) -> dict[str, Any]:
        c = self.config
        self.pools: PromptPools = self.backend.call("build_pools", c)
        self.references = ReferenceScores(self.run_dir / "reference_scores.json", c.model)
        init = self._init_namm(spec)
        norm = self._calibration(init)
        self.template = build_namm(spec).with_norm(norm)
        state = ckpt.load_state(self.run_dir)
        if state is None:
            x0 = None if init is None else lift_params(init, self.template.config).double().numpy()
            self.es = CMAES(dim=self.template.num_params, config=c.optimizer, x0=x0)
            self.history: list[dict[str, Any]] = []
            self.best_eval: dict[str, Any] | None = None
        else:
            self.es = CMAES.from_state_dict(state["optimizer"])
            self.history, self.best_eval = state["history"], state["best_eval"]
            self._write_outputs(best_changed=True)  # outputs may lag the checkpoint after a kill
        start = self.es.generation
        self._log_session(start)
        self.on_event("start", {"generation": start, "total": c.total_generations, "popsize": self.es.popsize,
                                "params": self.template.num_params, "run_dir": str(self.run_dir),
                                "conditions": self._conditions()})
        for g in range(start, c.total_generations):
            self._generation(g)
        final = self._state()
        self.on_event("done", {"generation": self.es.generation, "run_dir": str(self.run_dir)})
        return final

    def evaluate(self, namm_path: str | Path, backend: Any = None) -> dict[str, Any]:
        """Evaluate a NAMM folder on this run's eval prompts, as the run evaluates its CMA mean
        (same fitness, conditions, normalisation and full-cache references), without running or
        changing a generation: the reference point for the run's ``eval_fitness`` column (say, the
        NAMM the run started from). Only ``reference_scores.json`` may gain missing prompts.

        The NAMM must read the run's inputs (its parameters are lifted onto the run's NAMM, as
        ``init`` is) and carry the run's frozen normalisation, else the numbers would not compare.
        Returns {"fitness", "kept", "raw", "per_task", "prompts", "stage", "tasks"}.
        """
        from namm.memory.model import NAMM, resolve_pretrained

        c = self.config
        norm = ckpt.load_calibration(self.run_dir)
        if norm is None:
            raise ValueError(f"{str(self.run_dir)!r} has no calibration yet: start the run (namm evolve CONFIG --out "
                             f"{self.run_dir}) before evaluating a NAMM against it.")
        try:
            namm = NAMM.from_pretrained(resolve_pretrained(str(namm_path)))
        except (FileNotFoundError, ValueError) as exc:
            raise ValueError(f"--evaluate {str(namm_path)!r}: {exc}") from exc
        if namm.norm is None or not (torch.equal(namm.norm.mean, norm.mean) and torch.equal(namm.norm.var, norm.var)):
            raise ValueError(f"--evaluate {str(namm_path)!r}: its normalisation statistics are not this run's, so its "
                             "fitness would not compare with the run's evaluations.")
        spec = self._worker_spec()
        params = lift_params(namm, build_namm(spec).config).double().numpy()
        state = ckpt.load_state(self.run_dir)
        generation = 0 if state is None else min(state["generation"], c.total_generations - 1)
        stage_idx, _ = self.stage_of(generation)
        tasks = c.stages[stage_idx].tasks
        self.backend = backend or make_backend(c.backend, spec, c.ray, c.processes)
        try:
            self.pools = self.backend.call("build_pools", c)
            self.references = ReferenceScores(self.run_dir / "reference_scores.json", c.model)
            self.backend.set_calibration(norm)
            prompts = self.pools.eval_batch(tasks)
            refs = self._references(prompts)
            fit = member_fitness(c.fitness, prompts, self._run_split(params, prompts), refs, self._weights())
        finally:
            if backend is None:
                self.backend.close()
        return {"fitness": fit.fitness, "kept": fit.kept, "raw": fit.raw, "per_task": fit.per_task,
                "prompts": len(prompts), "stage": stage_idx + 1, "tasks": list(tasks)}

    def _log_session(self, generation: int) -> None:
        """One line per start or resume in ``sessions.jsonl``: where the generations from here ran
        (a run may move between machines and backends; ``namm export`` puts the lines in the provenance)."""
        from namm.evolution.export import hardware

        c = self.config
        workers = {"local": 1, "ray": c.ray.actors, "processes": c.processes.workers}[c.backend]
        line = {"generation": generation, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "backend": c.backend, "workers": workers, "threads": c.threads, "device": str(resolve_device(c.device)),
                "hardware": hardware(), "generations": c.total_generations}
        if self.extended:
            line["extended_from"] = self.extended[0]
        with (self.run_dir / ckpt.SESSIONS_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")

    def _init_namm(self, spec: WorkerSpec):
        """The NAMM of ``init`` (None without one), checked against the run's NAMM before any work."""
        if self.config.init is None:
            return None
        from namm.memory.model import NAMM, resolve_pretrained

        try:
            init = NAMM.from_pretrained(resolve_pretrained(self.config.init))
        except (FileNotFoundError, ValueError) as exc:
            raise ValueError(f"init = {self.config.init!r}: {exc}") from exc
        lift_params(init, build_namm(spec).config)  # raises if it cannot start this run
        return init

    def _calibration(self, init=None):
        """The frozen normalisation: the run's saved one, else ``init``'s (the statistics its
        parameters were evolved with), else a fresh calibration."""
        norm = ckpt.load_calibration(self.run_dir)
        if norm is None and init is not None and init.norm is not None:  # same inputs: lift_params checked
            norm = init.norm
            ckpt.save_calibration(self.run_dir, norm)
        if norm is None:
            prompts = self.pools.calibration_batch()
            self.on_event("calibrating", {"prompts": len(prompts), "task": self.config.calibration.task})
            norm = self.backend.call("calibrate", prompts)
            ckpt.save_calibration(self.run_dir, norm)
        self.backend.set_calibration(norm)
        return norm

    def stage_of(self, generation: int) -> tuple[int, int]:
        """(stage index, generation at which that stage ends) for a global generation number."""
        end = 0
        for i, stage in enumerate(self.config.stages):
            end += stage.generations
            if generation < end:
                return i, end
        raise ValueError(f"generation {generation} is past the last stage")

    def _generation(self, g: int) -> None:
        c = self.config
        t0 = time.perf_counter()
        stage_idx, stage_end = self.stage_of(g)
        tasks = c.stages[stage_idx].tasks
        prompts = self.pools.generation_batch(g, tasks)
        refs = self._references(prompts)
        members = self.es.ask()
        if getattr(self.backend, "affinity", False) and self.backend.workers > 1:  # each worker its own prompts
            jobs = split_jobs(members, prompts, self.backend.workers)
        else:
            jobs = [Job(i, members[i], prompts) for i in range(len(members))]
        finished = [0]

        def done(i: int) -> None:  # "member": how many members' worth of jobs are done, minus one
            finished[0] += 1
            self.on_event("member", {"generation": g, "member": finished[0] * len(members) // len(jobs) - 1,
                                     "popsize": len(members)})

        results = merge_results(jobs, self.backend.run(jobs, on_done=done), len(members))
        fits = [member_fitness(c.fitness, prompts, r, refs, self._weights()) for r in results]
        self.es.tell([f.fitness for f in fits])
        row = self._row(g, stage_idx, tasks, fits)
        best_changed = False
        if c.eval_interval and ((g + 1) % c.eval_interval == 0 or g + 1 == stage_end):
            best_changed = self._evaluate_mean(g, tasks, row)
        row["seconds"] = time.perf_counter() - t0
        self.history.append(row)
        ckpt.save_state(self.run_dir, self._state())
        self._write_outputs(best_changed)
        self.on_event("generation", row)

    def _row(self, g: int, stage_idx: int, tasks: list[str], fits: list[MemberFitness]) -> dict[str, Any]:
        values = [f.fitness for f in fits]
        best = int(np.argmax(values))
        return {"generation": g, "stage": stage_idx + 1, "tasks": list(tasks),
                "fitness_best": max(values), "fitness_mean": float(np.mean(values)), "fitness_worst": min(values),
                "raw_mean": float(np.mean([f.raw for f in fits])), "kept_mean": float(np.mean([f.kept for f in fits])),
                "kept_of_best": fits[best].kept, "sigma": self.es.sigma, "fitness": values,
                "member_score": [f.raw for f in fits], "member_kept": [f.kept for f in fits],
                "eval_fitness": None, "eval_kept": None}

    def _evaluate_mean(self, g: int, tasks: list[str], row: dict[str, Any]) -> bool:
        """Evaluate the CMA mean on the eval prompts; True if it is the best evaluation so far."""
        prompts = self.pools.eval_batch(tasks)
        refs = self._references(prompts)
        mean = self.es.mean
        fit = member_fitness(self.config.fitness, prompts, self._run_split(mean, prompts), refs, self._weights())
        row["eval_fitness"], row["eval_kept"], row["eval_per_task"] = fit.fitness, fit.kept, fit.per_task
        if self.best_eval is None or fit.fitness > self.best_eval["fitness"]:
            self.best_eval = {"fitness": fit.fitness, "kept": fit.kept, "generation": g, "params": mean}
            return True
        return False

    def _weights(self) -> dict[str, float]:
        return {t.name: float(t.weight) for t in self.config.tasks}

    def _conditions(self) -> str:
        """What the NAMM is evolved (and will be evaluated and shipped) under, in words."""
        from namm.engine import format_conditions
        from namm.evolution.fitness import namm_policy

        cfg = self.template.config
        keep = namm_policy(self.template).describe_keep()
        return format_conditions({**cfg.schedule, "chat": bool(cfg.chat), "keep": keep})

    def _references(self, prompts: list[Prompt]) -> list[PromptResult]:
        """Full-cache results for ``prompts``, computing (and caching) the ones not seen yet."""
        missing = self.references.missing(prompts)
        if missing:
            self.on_event("references", {"prompts": len(missing)})
            results = self._run_split(None, missing)
            self.references.add(missing, [r.to_dict() for r in results])
        return [PromptResult.from_dict(r) for r in self.references.get(prompts)]

    def _run_split(self, params: np.ndarray | None, prompts: list[Prompt]) -> list[PromptResult]:
        """Run one parameter vector on many prompts, split over the backend's workers."""
        jobs = split_jobs([params], prompts, int(getattr(self.backend, "workers", 1)))
        return merge_results(jobs, self.backend.run(jobs), 1)[0]

    # -- checkpoint and outputs -------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {"optimizer": self.es.state_dict(), "history": self.history, "best_eval": self.best_eval,
                "generation": self.es.generation}

    def _write_outputs(self, best_changed: bool) -> None:
        ckpt.export_namm(self.run_dir / "mean", self.template, self.es.mean)
        if best_changed and self.best_eval is not None:
            ckpt.export_namm(self.run_dir / "best", self.template, self.best_eval["params"])
        ckpt.write_log(self.run_dir / "log.csv", self.history)
        if self.history:
            plot_history(self.history, self.run_dir / "fitness.png", title=f"{self.config.model}: namm evolve")


def run_from_file(path: str | Path, output_dir: str | Path | None = None, resume: bool = False,
                  on_event: OnEvent | None = None, threads: int | None = None, backend: str | None = None,
                  workers: int | None = None, evaluate: str | Path | None = None,
                  dtype: str | None = None) -> dict[str, Any]:
    """Load a run's TOML file and run it (what ``namm evolve CONFIG`` does). ``threads`` (torch
    threads per worker), ``backend`` and ``workers`` (Ray actors or worker processes) override the
    file: execution settings, so a run may resume with others (say, on a GPU machine). With
    ``evaluate`` (a NAMM folder) nothing is evolved: :meth:`EvolutionRun.evaluate`'s result is returned.
    ``dtype`` overrides the model's dtype; it changes results, so it is part of the run's saved config
    and a resume must give the same."""
    config = load_config(path, output_dir)
    if dtype is not None:
        config.dtype = dtype
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be a positive integer, got {threads}.")
        config.threads = threads
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {BACKENDS}, got {backend!r}.")
        config.backend = backend
    if workers is not None:
        if config.backend == "local":
            raise ValueError("--workers needs --backend ray or processes (the local backend runs one worker).")
        if workers < 1:
            raise ValueError(f"--workers must be a positive integer, got {workers}.")
        if config.backend == "ray":
            config.ray.actors = workers
        else:
            config.processes.workers = workers
    run = EvolutionRun(config, resume=resume, on_event=on_event, config_text=Path(path).read_text())
    if evaluate is not None:
        if not run.run_dir.is_dir():
            raise ValueError(f"--evaluate needs the run's folder; {str(run.run_dir)!r} does not exist.")
        run._check_same_config()
        return run.evaluate(evaluate)
    return run.run()
