"""Which prompts a generation reads, and the full-cache scores they are normalised by.

Each task of a run has a fixed pool of prompts built once from the run seed. Generation ``g`` draws
``samples_per_task`` prompts per task without replacement with an RNG seeded by ``(seed, g)``: the
same prompts for every member, fresh ones every generation, and the draw of a resumed run is the
draw of the uninterrupted one without saving any RNG state. Evaluations of the mean read the first
``eval_samples_per_task`` prompts of each pool.

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


@dataclass
class Prompt:
    """One prompt of a task pool, as shipped to workers.

    id:     stable id, unique within the run ("task|L<length>|<sample id>").
    task:   the run's name for the task.
    sample: the task's :class:`namm.tasks.Sample` (prompt, answers, metric, max_new_tokens, stop).
    """

    id: str
    task: str
    sample: Any

    @property
    def prompt(self) -> str:
        return self.sample.prompt

    @property
    def answers(self) -> list[str]:
        return list(self.sample.answers)

    @property
    def max_new_tokens(self) -> int:
        return int(self.sample.max_new_tokens)


def build_pool(spec: TaskSpec, tokenizer, seed: int) -> list[Prompt]:
    """The prompt pool of one task (``namm.tasks.load_task``), deterministic for ``seed``.

    Synthetic tasks are generated from their ``train`` split (``options.split`` overrides it) at
    ``length`` tokens; benchmark and JSONL tasks read up to ``prompts`` records, middle-truncated
    to ``length`` tokens.
    """
    from namm.tasks import is_synthetic, load_task

    options = {"split": "train", **spec.options} if is_synthetic(spec.name) else dict(spec.options)
    samples = load_task(spec.name, tokenizer, length=spec.length, n=spec.prompts, seed=seed, **options)
    if not samples:
        raise ValueError(f"Task {spec.name!r} gave no prompts.")
    suffix = "" if not spec.options else "|" + hashlib.sha1(
        json.dumps(spec.options, sort_keys=True).encode()).hexdigest()[:8]
    return [Prompt(id=f"{spec.name}|L{spec.length}|{s.id}{suffix}", task=spec.name, sample=s) for s in samples]


class PromptPools:
    """The prompt pools of a run's tasks and the per-generation draws."""

    def __init__(self, config: RunConfig, pools: dict[str, list[Prompt]]) -> None:
        self.config = config
        self.pools = pools

    @classmethod
    def build(cls, config: RunConfig, tokenizer) -> "PromptPools":
        return cls(config, {t.name: build_pool(t, tokenizer, config.seed) for t in config.tasks})

    def generation_batch(self, generation: int, task_names: list[str]) -> list[Prompt]:
        """The prompts every member of ``generation`` reads: ``samples_per_task`` per task."""
        rng = np.random.default_rng([self.config.seed, 1, generation])
        batch = []
        for name in task_names:
            pool = self.pools[name]
            n = min(self.config.fitness.samples_per_task, len(pool))
            picks = rng.choice(len(pool), size=n, replace=False)
            batch += [pool[i] for i in sorted(picks.tolist())]
        return batch

    def eval_batch(self, task_names: list[str]) -> list[Prompt]:
        """The fixed prompts the mean is evaluated on."""
        n = self.config.fitness.eval_samples_per_task
        return [p for name in task_names for p in self.pools[name][:n]]

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
