"""Fitness of a NAMM parameter vector: run the engine on the generation's prompts, compare to full cache.

Two ways to score one prompt (``FitnessConfig.mode``):

* ``metric`` (the reference): greedy generation, scored by the task's metric (0-1).
  Per task, ``ratio_t = 100 mean_p(score) / (100 mean_p(full-cache score) + 1e-7)``: a ratio of sums
  on the same prompts, 1 meaning "as good as the full cache" (namm-algorithm.md section 5).
* ``loglik`` (continuous): the teacher-forced log-likelihood of the reference answer. Per task,
  ``ratio_t = exp(mean_p((LL_p - LL_full_p) / n_p))`` with n_p the answer's tokens: the geometric
  mean over prompts of the per-token likelihood ratio to the full cache (equivalently
  full-cache perplexity / NAMM perplexity). 1 again means "as good as the full cache"; unlike the
  metric it moves smoothly, so it still ranks members when every greedy answer is wrong.

The fitness is the unweighted mean of ``ratio_t`` over tasks, then the cache terms:
``kept_penalty`` subtracts ``kept_penalty * kept`` (kept = mean over prompts of the engine
report's ``kept_fraction``); with ``kept_cap`` a member keeping more than the cap gets
``min(f, 0) - (kept - cap)``, so it ranks below every member within the cap (whose fitness is >= 0)
and over-cap members rank by how far over they are.

:class:`Worker` is what runs in a worker process (or Ray actor): the loaded model, the engine and a
NAMM template with the run's frozen normalisation statistics.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from namm.evolution.config import FitnessConfig
from namm.evolution.prompts import Prompt
from namm.sequence import EngineConfig

log = logging.getLogger(__name__)

GUARD = 1e-7  # the reference's guard against an all-zero full-cache score


@dataclass
class PromptResult:
    """One prompt under one policy.

    score:  task metric of the greedy answer (metric mode; NaN otherwise).
    loglik: sum log p(first reference answer | prompt) (loglik mode; NaN otherwise).
    tokens: answer tokens the log-likelihood is summed over.
    kept:   the engine report's kept_fraction at the end of the sequence.
    """

    score: float = math.nan
    loglik: float = math.nan
    tokens: int = 0
    kept: float = 1.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> "PromptResult":
        return cls(**data)


@dataclass
class MemberFitness:
    """A member's fitness and what it is made of (logged per generation)."""

    fitness: float
    raw: float  # mean task ratio before the cache terms
    kept: float
    per_task: dict[str, float] = field(default_factory=dict)


def task_ratio(mode: str, results: list[PromptResult], refs: list[PromptResult]) -> float:
    """One task's score relative to the full cache on the same prompts (see module docstring)."""
    if mode == "metric":
        score = 100.0 * float(np.mean([r.score for r in results]))
        ref = 100.0 * float(np.mean([r.score for r in refs]))
        return score / (ref + GUARD)
    diffs = [(r.loglik - f.loglik) / max(r.tokens, 1) for r, f in zip(results, refs, strict=True)]
    return float(math.exp(float(np.mean(diffs))))


def member_fitness(config: FitnessConfig, prompts: list[Prompt], results: list[PromptResult],
                   refs: list[PromptResult]) -> MemberFitness:
    """Fitness of one member from its per-prompt results and the full-cache ones (same order)."""
    per_task: dict[str, float] = {}
    for task in dict.fromkeys(p.task for p in prompts):
        idx = [i for i, p in enumerate(prompts) if p.task == task]
        per_task[task] = task_ratio(config.mode, [results[i] for i in idx], [refs[i] for i in idx])
    raw = float(np.mean(list(per_task.values())))
    kept = float(np.mean([r.kept for r in results]))
    fitness = raw - config.kept_penalty * kept
    if config.kept_cap is not None and kept > config.kept_cap:
        fitness = min(fitness, 0.0) - (kept - config.kept_cap)
    return MemberFitness(fitness=fitness, raw=raw, kept=kept, per_task=per_task)


@dataclass
class WorkerSpec:
    """A picklable recipe for a :class:`Worker`, so any process (or Ray actor) can build one."""

    model: str
    dtype: str | None
    device: str | None
    engine: EngineConfig
    namm: dict[str, Any]
    mode: str = "metric"
    threads: int | None = None  # torch CPU threads in this worker (None: torch's default)

    def build(self) -> "Worker":
        return Worker(self)


@dataclass
class Job:
    """Evaluate ``params`` (None: the full cache) on ``prompts``; ``key`` says whose job it is."""

    key: int
    params: np.ndarray | None
    prompts: list[Prompt]


class Worker:
    """A loaded model plus a NAMM template: turns jobs into per-prompt results."""

    def __init__(self, spec: WorkerSpec) -> None:
        from namm.engine import Engine
        from namm.models import load_model

        self.spec = spec
        if spec.threads:
            torch.set_num_threads(spec.threads)
        model, tokenizer = load_model(spec.model, dtype=spec.dtype, device=spec.device)
        self.engine = Engine(model, tokenizer, config=spec.engine)
        self.namm = build_namm(spec)

    def num_params(self) -> int:
        return self.namm.num_params

    def build_pools(self, config):
        """The run's prompt pools, built with this worker's tokenizer."""
        from namm.evolution.prompts import PromptPools

        return PromptPools.build(config, self.engine.tokenizer)

    def set_calibration(self, norm) -> None:
        """Freeze the normalisation statistics every member's NAMM uses."""
        self.namm = self.namm.with_norm(norm)

    def calibrate(self, prompts: list[Prompt]):
        """Normalisation statistics from full-cache runs on ``prompts`` (stage 1, step 1)."""
        from namm.memory.calibration import calibrate

        return calibrate(self.engine, self.namm, [p.prompt for p in prompts], progress=False).norm

    def run(self, job: Job) -> list[PromptResult]:
        policy = None if job.params is None else namm_policy(self.namm.with_params(torch.as_tensor(job.params)))
        with torch.inference_mode():
            return [self.run_prompt(p, policy) for p in job.prompts]

    def run_prompt(self, prompt: Prompt, policy) -> PromptResult:
        if self.spec.mode == "loglik":
            return self._loglik(prompt, policy)
        out = self.engine.generate(prompt.prompt, max_new_tokens=prompt.max_new_tokens, do_sample=False,
                                   stop=getattr(prompt.sample, "stop", None), policy=policy)
        return PromptResult(score=score_answer(prompt, out.text), kept=float(out.report.kept_fraction))

    def _loglik(self, prompt: Prompt, policy) -> PromptResult:
        if not prompt.answers or not prompt.answers[0]:
            raise ValueError(f"Prompt {prompt.id}: the reference answer is empty; loglik fitness needs one.")
        # the context is formatted as for generation (chat template if the tokenizer has one)
        loglik, tokens, report = self.engine.loglikelihood(prompt.prompt, prompt.answers[0], policy=policy,
                                                           chat=None, return_report=True)
        return PromptResult(loglik=loglik, tokens=tokens, kept=float(report.kept_fraction))


def build_namm(spec: WorkerSpec):
    """The run's NAMM template (zero parameters, not yet calibrated) from the [namm] table.

    The NAMM's schedule (delay, chunk size) defaults to the engine's, so a saved checkpoint
    records the schedule it was evolved with.
    """
    from namm.memory.model import NAMM, NAMMConfig

    table = {"delay": spec.engine.delay, "chunk_size": spec.engine.chunk_size, "evolved_on": spec.model,
             **spec.namm}
    return NAMM(NAMMConfig.from_dict(table))


def namm_policy(namm):
    """The memory policy that runs a NAMM under the engine."""
    from namm.policies.namm import NAMMPolicy

    return NAMMPolicy(namm=namm)


def score_answer(prompt: Prompt, text: str) -> float:
    """The task metric of ``text`` against the prompt's reference answers, in [0, 1]."""
    from namm.tasks.base import score_sample

    return float(score_sample(prompt.sample, text))
