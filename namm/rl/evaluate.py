"""``namm eval --tasks rl:<task>``: a Decision Transformer's normalised return under every method.

The evaluation suite of control tasks (see :mod:`namm.evaluation.runner`): a sample is an episode
start seed, a row one episode played through the engine under the variant's policy
(:func:`namm.rl.rollout.rollout`), its score the normalised return / 100 (so the tables' 100 x mean
is the D4RL normalised score: expert = 100, random = 0, both measured by the data generator over
the same horizon and recorded in the model's config). Rows, resume, ``--match-namm``, standard
errors, tables and plot are the language evaluation's own.

``--model`` is the Decision Transformer's folder (``namm rl train``); left at its default it is
``runs/rl/<task>/dt``. Evaluation episodes start from seeds ``EVAL_SEED_BASE + 100,000 x --seed + i``,
never used by the data generator.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from namm.rl.envs import EVAL_SEED_BASE, get_task, make_env
from namm.rl.model import DecisionTransformer, load_dt
from namm.rl.rollout import rollout
from namm.rl.train import default_model_dir

__all__ = ["ControlEpisodes", "EpisodeSeed", "eval_seeds"]


@dataclass(frozen=True)
class EpisodeSeed:
    """One evaluation episode: its id in ``rows.jsonl`` and the seed its start state comes from."""

    id: str
    seed: int


def eval_seeds(seed: int, n: int) -> list[EpisodeSeed]:
    """The ``n`` evaluation episodes of run seed ``seed`` (disjoint from the data's seeds)."""
    return [EpisodeSeed(f"episode-{i}", EVAL_SEED_BASE + 100_000 * seed + i) for i in range(n)]


class ControlEpisodes:
    """The ``rl:<task>`` suite of :func:`namm.evaluation.runner.run_evaluation`."""

    unit = "episode"

    def __init__(self, config, model: DecisionTransformer, tokenizer, engine_config) -> None:
        from namm.engine import Engine

        task = get_task(config.control_task)
        if not isinstance(model, DecisionTransformer):
            raise ValueError(f"{config.control_task} is played by a Decision Transformer (namm.rl.model), got "
                             f"{type(model).__name__}; pass --model DIR written by `namm rl train`.")
        if model.config.task != task.name:
            raise ValueError(f"The Decision Transformer was trained on {model.config.task!r}, not {task.name!r}.")
        model.config.normalise(0.0)  # an error that says how to get the reference returns, if they are missing
        self.config, self.dt = config, model.eval()
        self.engine = Engine(model.backbone, None, config=engine_config)
        self.env = make_env(task, model.config.horizon)

    @staticmethod
    def load(config) -> tuple[Any, DecisionTransformer, None]:
        """The Decision Transformer of ``config.model`` (its default: ``runs/rl/<task>/dt``)."""
        from namm.models import DEFAULT_MODEL, resolve_device, resolve_dtype

        task = get_task(config.control_task).name
        path = default_model_dir(task) if config.model == DEFAULT_MODEL else Path(config.model)
        if not path.exists():
            raise FileNotFoundError(f"No Decision Transformer in {path}; make one with `namm rl data --task {task}` "
                                    f"then `namm rl train --task {task}`, or pass --model DIR.")
        dt = load_dt(path, dtype=resolve_dtype(config.dtype), device=resolve_device(config.device))
        return replace(config, model=str(path)), dt, None

    def work(self) -> list[tuple[str, None, EpisodeSeed]]:
        return [(self.config.control_task, None, s) for s in eval_seeds(self.config.seed, self.config.limit)]

    def run(self, variant, task: str, length: None, sample: EpisodeSeed, policy) -> dict[str, Any]:
        from namm.evaluation.runner import make_row

        result = rollout(self.engine, self.dt, self.env, sample.seed, policy=policy)
        return make_row(variant, task, length, sample.id, {
            "score": result.normalised / 100, "metric": "normalised_return", "return": result.ret,
            "normalised_return": result.normalised, "steps": result.steps, "terminated": result.terminated,
            "seed": sample.seed, "tokens": result.tokens,
        }, result.report, {"tokens_per_s": result.tokens / max(result.seconds, 1e-9), "total_s": result.seconds})

    def conditions(self, keep: str) -> str:
        c = self.engine.config
        return (f"chunk {c.chunk_size}, delay {c.delay} (an episode is one stream of tokens: eviction every "
                f"{c.delay} tokens), target return {self.dt.config.target_return:.1f}, keep {keep}")

    def notes(self) -> list[str]:
        dt = self.dt.config
        ref = dt.ref_returns
        return [f"Score: the normalised return, 100 x (return - random) / (expert - random), with expert = "
                f"{ref['expert']:.1f} (the data generator's expert acting without noise) and random = "
                f"{ref['random']:.1f} (uniform random actions), both mean returns over the {dt.horizon}-step "
                f"horizon; n = episodes per cell, each up to {3 * dt.horizon - 1} tokens (return to go, state and "
                f"action per step), started from seeds the training data never used."]
