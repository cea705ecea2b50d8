"""Which prompts a generation reads, and the full-cache scores they are normalised by.

Each task of a run has a fixed training pool of prompts built once from the run seed (the
``train`` split). Generation ``g`` draws ``samples`` prompts per task without replacement with an
RNG seeded by ``(seed, g)``: the same prompts for every member, fresh ones every generation, and
the draw of a resumed run is the draw of the uninterrupted one without saving any RNG state.

Evaluations of the mean read a separate eval pool per task that never overlaps the training
pool: ``eval_samples_per_task`` prompts of ``fitness.eval_split`` generated with seed
``seed + EVAL_SEED_OFFSET`` (other random streams, other sample ids; with the default ``test``
split also other wordings and other filler books). ``namm eval`` draws its test prompts with
seed 0 by default, so it does not reread the prompts the best mean was selected on either.

The full-cache (reference) result of every prompt is computed once and cached on disk in the run
folder, keyed by model, task and prompt id.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from namm.evolution.checkpoint import atomic_write_text
from namm.evolution.config import RunConfig, TaskSpec

EVAL_SEED_OFFSET = 1_000_000  # the eval pool's seed is the run seed plus this


@dataclass
class Prompt:
    """One prompt of a task pool, as shipped to workers.

    id:        stable id, unique within the run ("task|L<length>|<sample id>").
    task:      the run's name for the task.
    sample:    the task's :class:`namm.tasks.Sample` (prompt, answers, metric, max_new_tokens, stop).
    objective: how a result is scored: "metric" (greedy answer, task metric), "loglik" (likelihood
               of the reference answer) or "margin" (its tokens' margins over the runner-up token);
               see namm.evolution.fitness.
    """

    id: str
    task: str
    sample: Any
    objective: str = "metric"

    @property
    def prompt(self) -> str:
        return self.sample.prompt

    @property
    def answers(self) -> list[str]:
        return list(self.sample.answers)

    @property
    def max_new_tokens(self) -> int:
        return int(self.sample.max_new_tokens)


def build_pool(spec: TaskSpec, tokenizer, seed: int, mode: str = "metric", split: str = "train",
               n: int | None = None) -> list[Prompt]:
    """A prompt pool of one task (``namm.tasks.load_task``), deterministic for ``seed``.

    Synthetic and continuation tasks are generated from ``split`` (``options.split`` overrides it)
    at ``length`` tokens, ``n`` of them (default ``spec.prompts``); benchmark and JSONL tasks read
    up to ``n`` records, middle-truncated to ``length`` tokens. Prompts are scored by ``mode``
    ("metric", "loglik" or "margin"), except likelihood tasks (continuation), which always are "loglik".
    """
    from namm.tasks import has_splits, load_task
    from namm.tasks.continuation import LOGLIK

    options = {"split": split, **spec.options} if has_splits(spec.name) else dict(spec.options)
    samples = load_task(spec.name, tokenizer, length=spec.length, n=n or spec.prompts, seed=seed, **options)
    if not samples:
        raise ValueError(f"Task {spec.name!r} gave no prompts.")
    suffix = "" if not spec.options else "|" + hashlib.sha1(
        json.dumps(spec.options, sort_keys=True).encode()).hexdigest()[:8]
    return [Prompt(id=f"{spec.name}|L{spec.length}|{s.id}{suffix}", task=spec.name, sample=s,
                   objective=LOGLIK if s.metric == LOGLIK else mode) for s in samples]


def _train_and_eval_pools(config: RunConfig, spec: TaskSpec, tokenizer) -> tuple[list[Prompt], list[Prompt]]:
    """A task's training pool and its disjoint eval pool (see the module docstring).

    Tasks without splits (benchmarks, JSONL) read ``prompts + eval_samples_per_task`` records:
    the training pool is the first ``prompts``, the eval pool the records after them.
    """
    from namm.tasks import has_splits

    fit = config.fitness
    if has_splits(spec.name):
        return (build_pool(spec, tokenizer, config.seed, fit.mode),
                build_pool(spec, tokenizer, config.seed + EVAL_SEED_OFFSET, fit.mode, fit.eval_split,
                           fit.eval_samples_per_task))
    records = build_pool(spec, tokenizer, config.seed, fit.mode, n=spec.prompts + fit.eval_samples_per_task)
    train, held_out = records[: spec.prompts], records[spec.prompts:]
    if config.eval_interval and not held_out:
        raise ValueError(f"Task {spec.name!r} has {len(records)} records, all in the training pool "
                         f"([[tasks]] prompts = {spec.prompts}); lower prompts to leave some for the eval pool.")
    return train, held_out


class PromptPools:
    """The training and eval pools of a run's tasks, and the per-generation draws."""

    def __init__(self, config: RunConfig, pools: dict[str, list[Prompt]],
                 eval_pools: dict[str, list[Prompt]] | None = None) -> None:
        self.config = config
        self.pools = pools
        self.eval_pools = eval_pools if eval_pools is not None else {}

    @classmethod
    def build(cls, config: RunConfig, tokenizer) -> "PromptPools":
        pools, eval_pools = {}, {}
        for spec in config.tasks:
            pools[spec.name], eval_pools[spec.name] = _train_and_eval_pools(config, spec, tokenizer)
        return cls(config, pools, eval_pools)

    def generation_batch(self, generation: int, task_names: list[str]) -> list[Prompt]:
        """The prompts every member of ``generation`` reads: ``config.samples(task)`` per task."""
        rng = np.random.default_rng([self.config.seed, 1, generation])
        batch = []
        for name in task_names:
            pool = self.pools[name]
            n = min(self.config.samples(name), len(pool))
            picks = rng.choice(len(pool), size=n, replace=False)
            batch += [pool[i] for i in sorted(picks.tolist())]
        return batch

    def eval_batch(self, task_names: list[str]) -> list[Prompt]:
        """The fixed prompts the mean is evaluated on (the eval pools, disjoint from training)."""
        return [p for name in task_names for p in self.eval_pools[name]]

    def calibration_batch(self) -> list[Prompt]:
        cal = self.config.calibration
        return self.pools[cal.task][: cal.samples]


class ReferenceScores:
    """Full-cache results per prompt, cached in a JSON file (written atomically).

    Keys are ``"model|prompt id"`` (the prompt id names task, length and sample); values are
    the dicts produced by :func:`namm.evolution.fitness.prompt_result` (score, loglik, tokens, kept).
    """

    def __init__(self, path: str | Path, model: str) -> None:
        self.path = Path(path)
        self.model = model
        self.table: dict[str, dict[str, float]] = {}
        if self.path.exists():
            self.table = json.loads(self.path.read_text())

    def key(self, prompt: Prompt) -> str:
        return f"{self.model}|{prompt.id}"

    def missing(self, prompts: list[Prompt]) -> list[Prompt]:
        seen, out = set(), []
        for p in prompts:
            if self.key(p) not in self.table and p.id not in seen:
                seen.add(p.id)
                out.append(p)
        return out

    def add(self, prompts: list[Prompt], results: list[dict[str, float]]) -> None:
        for p, r in zip(prompts, results, strict=True):
            self.table[self.key(p)] = r
        atomic_write_text(self.path, json.dumps(self.table, indent=0, sort_keys=True))

    def get(self, prompts: list[Prompt]) -> list[dict[str, float]]:
        return [self.table[self.key(p)] for p in prompts]
