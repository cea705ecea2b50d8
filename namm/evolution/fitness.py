"""Fitness of a NAMM parameter vector: run the engine on the generation's prompts, compare to full cache.

Three ways to score one prompt (its ``Prompt.objective``: ``FitnessConfig.mode`` for task prompts,
always ``loglik`` for the continuation task):

* ``metric`` (the reference): greedy generation, scored by the task's metric (0-1). Per task,
  ``ratio_t = sum_p score_p / sum_p full_p`` over the prompts p whose full-cache score full_p is
  above 0: a ratio of sums on the same prompts, 1 meaning "as good as the full cache"
  (namm-algorithm.md section 5). Prompts the full cache fails do not count: they say nothing
  about what the compression lost, and the reference's ``score / (0 + 1e-7)`` made a task's
  ratio explode (~1e9) on them. A task none of whose prompts count this generation drops out of
  the mean over tasks.
* ``loglik`` (continuous): the teacher-forced log-likelihood of the reference answer (or of the
  held-back continuation). Per task, ``ratio_t = exp(mean_p((LL_p - LL_full_p) / n_p))`` with n_p
  the answer's tokens: the geometric mean over prompts of the per-token likelihood ratio to the
  full cache (equivalently full-cache perplexity / NAMM perplexity). 1 again means "as good as
  the full cache"; unlike the metric it moves smoothly, so it still ranks members when every
  greedy answer is wrong.
* ``margin`` (a smooth stand-in for greedy exact match, at the cost of ``loglik``): teacher-forced,
  per answer token, the margin m of its log-probability over the best other token (m > 0 where it
  is the argmax: greedy decoding writes the whole answer iff every m > 0; the answer follows the
  prompt as greedy decoding writes it, see :func:`answer_continuation`). A prompt scores
  ``sigmoid(min_tokens(m) / MARGIN_SCALE)``: its binding token, the one greedy decoding is
  likeliest to get wrong. Per task, ``ratio_t = sum_p score_p / sum_p full_p`` over the prompts
  whose full-cache answer is the argmax at every token, as ``metric`` (a task none of whose
  prompts count drops out). On 192 held-out (policy, prompt) pairs the smallest margin separates
  right from wrong greedy answers with ROC AUC 0.998, the mean of the tokens' sigmoids 0.980 and
  the loglik objective's per-token likelihood 0.865 (``benchmarks/fitness_proxies.py``,
  ``docs/results/fitness-proxies``); and only the smallest margin ranked the shipped NAMM above a
  later one whose greedy answers were worse.

Every ratio is capped at ``MAX_RATIO`` (2), so no task can dominate the mean. The raw fitness is
the mean of ``ratio_t`` over tasks weighted by ``[[tasks]] weight``; when no task counts (the
full cache scored 0 on every prompt of the generation) it is 1 for every member: no evidence
that any member differs from the full cache. Then the cache terms (threshold keep mode only; in
budget mode every member keeps the same cache): ``kept_penalty`` subtracts
``kept_penalty * kept`` (kept = mean over prompts of the engine report's ``kept_fraction``);
with ``kept_cap`` a member keeping more than the cap gets ``min(f, 0) - (kept - cap)``, so it
ranks below every member within the cap (whose fitness is >= 0) and over-cap members rank by
how far over they are.

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
from namm.prefix import PrefixStore
from namm.sequence import EngineConfig

log = logging.getLogger(__name__)

MAX_RATIO = 2.0  # cap on a task's ratio to the full cache
MARGIN_SCALE = 1.0  # nats: a smallest margin of +1 scores sigmoid(1) = 0.73, +3 scores 0.95 (margin objective)
NO_EVIDENCE = 1.0  # raw fitness when no task has a prompt that counts


@dataclass
class PromptResult:
    """One prompt under one policy.

    score:  task metric of the greedy answer (metric objective; NaN otherwise).
    loglik: sum log p(first reference answer | prompt) (loglik objective; NaN otherwise).
    tokens: answer tokens the log-likelihood is summed over.
    kept:   the engine report's kept_fraction at the end of the sequence.
    margins: per answer token, log p(token) - max log p(other token) (margin objective; else empty).
    """

    score: float = math.nan
    loglik: float = math.nan
    tokens: int = 0
    kept: float = 1.0
    margins: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PromptResult":
        return cls(**data)

    @property
    def margin_score(self) -> float:
        """sigmoid(smallest margin / MARGIN_SCALE) (margin objective): the binding answer token."""
        return 1.0 / (1.0 + math.exp(-min(self.margins) / MARGIN_SCALE))

    @property
    def argmax_answer(self) -> bool:
        """Whether the answer is the argmax at every token (greedy decoding would write it)."""
        return bool(self.margins) and min(self.margins) > 0


@dataclass
class MemberFitness:
    """A member's fitness and what it is made of (logged per generation)."""

    fitness: float
    raw: float  # weighted mean task ratio before the cache terms (the member's "score")
    kept: float
    per_task: dict[str, float] = field(default_factory=dict)  # the tasks that counted


def task_ratio(objective: str, results: list[PromptResult], refs: list[PromptResult]) -> float | None:
    """One task's score relative to the full cache on the same prompts, in [0, MAX_RATIO]; None
    when no prompt counts (metric objective, full cache scoring 0 on all of them). See the module
    docstring."""
    if objective == "metric":
        counted = [i for i, ref in enumerate(refs) if ref.score > 0]
        if not counted:
            return None
        ratio = sum(results[i].score for i in counted) / sum(refs[i].score for i in counted)
    elif objective == "margin":
        counted = [i for i, ref in enumerate(refs) if ref.argmax_answer]
        if not counted:
            return None
        ratio = sum(results[i].margin_score for i in counted) / sum(refs[i].margin_score for i in counted)
    else:
        ratio = math.exp(min(float(np.mean(loglik_diffs(results, refs))), math.log(MAX_RATIO)))
    return min(float(ratio), MAX_RATIO)


def loglik_diffs(results: list[PromptResult], refs: list[PromptResult]) -> list[float]:
    """Per prompt, the per-token log-likelihood of the answer minus the full cache's."""
    return [(r.loglik - f.loglik) / max(r.tokens, 1) for r, f in zip(results, refs, strict=True)]


def member_fitness(config: FitnessConfig, prompts: list[Prompt], results: list[PromptResult],
                   refs: list[PromptResult], weights: dict[str, float] | None = None) -> MemberFitness:
    """Fitness of one member from its per-prompt results and the full-cache ones (same order);
    ``weights`` are the tasks' weights (default 1)."""
    per_task: dict[str, float] = {}
    for task in dict.fromkeys(p.task for p in prompts):
        idx = [i for i, p in enumerate(prompts) if p.task == task]
        ratio = task_ratio(prompts[idx[0]].objective, [results[i] for i in idx], [refs[i] for i in idx])
        if ratio is not None:
            per_task[task] = ratio
    w = {task: (weights or {}).get(task, 1.0) for task in per_task}
    raw = sum(w[t] * r for t, r in per_task.items()) / sum(w.values()) if per_task else NO_EVIDENCE
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
    namm: dict[str, Any]  # the NAMM's config, conditions included (RunConfig.namm_config())
    threads: int | None = None  # torch CPU threads in this worker (None: torch's default)
    share_prefix: bool = True  # read each prompt's first ``delay`` tokens once for all members (namm.prefix)

    def build(self) -> "Worker":
        return Worker(self)


@dataclass
class Job:
    """Evaluate ``params`` (None: the full cache) on ``prompts``; ``key`` says whose job it is.

    ``affinity``: the worker that should run it if it is free (a backend that can choose, Ray);
    jobs on the same prompts go to the same worker so each prompt's shared prefix is read once.
    """

    key: int
    params: np.ndarray | None
    prompts: list[Prompt]
    affinity: int | None = None


def split_jobs(members: list[np.ndarray], prompts: list[Prompt], workers: int) -> list[Job]:
    """One job per member and group of prompts: the prompts cut into ``workers`` contiguous groups,
    group k's jobs with affinity k, so a worker reads only its own prompts' shared prefixes (with
    whole-member jobs every worker reads every prompt's). Members first, then groups, so the
    workers start on different groups. :func:`merge_results` puts the results back per member."""
    n = max(1, min(workers, len(prompts)))
    bounds = [round(k * len(prompts) / n) for k in range(n + 1)]
    groups = [prompts[bounds[k]:bounds[k + 1]] for k in range(n)]
    return [Job(i, params, group, affinity=k if n > 1 else None)
            for i, params in enumerate(members) for k, group in enumerate(groups)]


def merge_results(jobs: list[Job], results: list[list["PromptResult"]], members: int) -> list[list["PromptResult"]]:
    """Per member, its jobs' results in prompt order (the inverse of :func:`split_jobs`)."""
    merged: list[list[PromptResult]] = [[] for _ in range(members)]
    for job, result in sorted(zip(jobs, results), key=lambda pair: (pair[0].key, pair[0].affinity or 0)):
        merged[job.key].extend(result)
    return merged


class Worker:
    """A loaded model plus a NAMM template: turns jobs into per-prompt results."""

    def __init__(self, spec: WorkerSpec) -> None:
        from namm.engine import Engine
        from namm.models import load_model

        self.spec = spec
        if spec.threads:
            torch.set_num_threads(spec.threads)
        model, tokenizer = load_model(spec.model, dtype=spec.dtype, device=spec.device)
        store = PrefixStore(max_entries=64) if spec.share_prefix else None
        self.engine = Engine(model, tokenizer, config=spec.engine, prefix_store=store)
        self.namm = build_namm(spec)

    def num_params(self) -> int:
        return self.namm.num_params

    def clear_prefixes(self) -> None:
        """Forget the shared prompt prefixes (benchmarks: every timed generation pays for its own)."""
        if self.engine.prefix_store is not None:
            self.engine.prefix_store.clear()

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

        ids = [self.engine.encode(p.prompt, chat=self._chat(p)) for p in prompts]  # formatted as run_prompt does
        return calibrate(self.engine, self.namm, ids, progress=False).norm

    def run(self, job: Job) -> list[PromptResult]:
        policy = None if job.params is None else namm_policy(self.namm.with_params(torch.as_tensor(job.params)))
        with torch.inference_mode():
            return [self.run_prompt(p, policy) for p in job.prompts]

    def run_prompt(self, prompt: Prompt, policy) -> PromptResult:
        """One prompt under ``policy`` (None: the full cache), scored by its objective; members and
        the full-cache reference read it formatted alike: as the NAMM records (chat or raw)."""
        chat = self._chat(prompt)
        if prompt.objective in ("loglik", "margin"):
            return self._loglik(prompt, policy, chat, margins=prompt.objective == "margin")
        out = self.engine.generate(prompt.prompt, max_new_tokens=prompt.max_new_tokens, do_sample=False,
                                   stop=getattr(prompt.sample, "stop", None), chat=chat, policy=policy)
        return PromptResult(score=score_answer(prompt, out.text), kept=float(out.report.kept_fraction))

    def _chat(self, prompt: Prompt) -> bool:
        return bool(self.namm.config.chat) and not prompt.sample.meta.get("no_chat", False)

    def _loglik(self, prompt: Prompt, policy, chat: bool, margins: bool = False) -> PromptResult:
        if not prompt.answers or not prompt.answers[0]:
            raise ValueError(f"Prompt {prompt.id}: the reference answer is empty; "
                             f"{prompt.objective} fitness needs one.")
        if margins:
            answer = answer_continuation(prompt.prompt, prompt.answers[0], chat)
            per_token, loglik, report = self.engine.answer_margins(prompt.prompt, answer, policy=policy, chat=chat)
            return PromptResult(loglik=loglik, tokens=len(per_token), kept=float(report.kept_fraction),
                                margins=per_token)
        loglik, tokens, report = self.engine.loglikelihood(prompt.prompt, prompt.answers[0], policy=policy,
                                                           chat=chat, return_report=True)
        return PromptResult(loglik=loglik, tokens=tokens, kept=float(report.kept_fraction))


def answer_continuation(prompt: str, answer: str, chat: bool) -> str:
    """The reference answer as greedy decoding continues ``prompt`` with it (margin objective): after
    one space when a raw prompt ends in a non-space character ("The pass key is" + " 97423", as
    lm-evaluation-harness's ``target_delimiter``), as it is after whitespace or a chat template's
    assistant turn. The ``loglik`` objective scores the answer as given (what the runs so far
    were evolved on)."""
    if chat or not prompt or prompt[-1].isspace() or not answer or answer[0].isspace():
        return answer
    return " " + answer


def build_namm(spec: WorkerSpec):
    """The run's NAMM template (zero parameters, not yet calibrated): its config records the
    conditions it is evolved under (schedule, chat, keep mode), so every saved checkpoint does."""
    from namm.memory.model import NAMM, NAMMConfig

    return NAMM(NAMMConfig.from_dict(spec.namm))


def namm_policy(namm):
    """The memory policy that runs a NAMM under the engine."""
    from namm.policies.namm import NAMMPolicy

    return NAMMPolicy(namm=namm)


def score_answer(prompt: Prompt, text: str) -> float:
    """The task metric of ``text`` against the prompt's reference answers, in [0, 1]."""
    from namm.tasks.base import score_sample

    return float(score_sample(prompt.sample, text))
