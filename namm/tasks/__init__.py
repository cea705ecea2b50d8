"""Tasks and metrics: synthetic long-context tasks generated offline, LongBench, InfiniteBench and
ChouBun with their official prompts, lengths and metrics, and local JSONL files.

``load_task(name, tokenizer, ...)`` is the one entry point. Names:

* synthetic: ``passkey``, ``niah_single``, ``niah_multikey``, ``niah_multivalue``,
  ``kv_retrieval``, ``variable_tracking``, ``frequent_words``, ``multihop`` (need ``length``);
* ``continuation``: held-back prose to be continued, scored by likelihood (evolution's dense
  objective, :mod:`namm.tasks.continuation`; needs ``length``);
* ``longbench:<task>`` (or the bare LongBench name, e.g. ``qasper``), ``infinitebench:<task>``,
  ``choubun:<task>`` (or the bare ChouBun name, e.g. ``wiki_qa``);
* a path to a ``.jsonl`` file (``jsonl:<path>`` also works).
"""

from __future__ import annotations

from pathlib import Path

from namm.tasks import metrics
from namm.tasks.base import Sample, count_tokens, middle_truncate, score_sample
from namm.tasks import continuation
from namm.tasks.choubun import CHOUBUN_TASKS, choubun_samples
from namm.tasks.filler import FILLERS
from namm.tasks.infinitebench import INFINITEBENCH_TASKS, infinitebench_samples
from namm.tasks.jsonl import load_jsonl_task
from namm.tasks.longbench import LONGBENCH_TASKS, longbench_samples
from namm.tasks.metrics import METRICS
from namm.tasks.synthetic import SYNTHETIC_TASKS, generate

__all__ = [
    "CHOUBUN_TASKS", "FILLERS", "INFINITEBENCH_TASKS", "LONGBENCH_TASKS", "METRICS", "SYNTHETIC_TASKS",
    "TASK_OPTIONS", "Sample", "count_tokens", "has_splits", "is_synthetic", "list_tasks", "load_task", "metrics",
    "middle_truncate", "resolve_task", "score_sample",
]

TASK_OPTIONS = ("split", "filler", "data_dir", "continuation_tokens")  # load_task's optional keywords

_LOADERS = {"longbench": longbench_samples, "infinitebench": infinitebench_samples, "choubun": choubun_samples}
_BENCH_TASKS = {"longbench": LONGBENCH_TASKS, "infinitebench": INFINITEBENCH_TASKS, "choubun": CHOUBUN_TASKS}


def list_tasks() -> list[str]:
    """Every task name ``load_task`` accepts (besides JSONL paths)."""
    names = [*SYNTHETIC_TASKS, continuation.CONTINUATION]
    for bench, tasks in _BENCH_TASKS.items():
        names += [f"{bench}:{t}" for t in tasks]
    return names


def resolve_task(name: str) -> tuple[str, str]:
    """``(kind, task)`` with kind one of synthetic, continuation, longbench, infinitebench, choubun, jsonl."""
    if name.startswith("jsonl:") or name.endswith(".jsonl"):
        return "jsonl", name.removeprefix("jsonl:")
    if ":" in name:
        bench, task = name.split(":", 1)
        if bench not in _BENCH_TASKS:
            raise ValueError(f"Unknown benchmark {bench!r} in {name!r}; use {', '.join(_BENCH_TASKS)}.")
        if task not in _BENCH_TASKS[bench]:
            raise ValueError(f"Unknown {bench} task {task!r}; known: {', '.join(_BENCH_TASKS[bench])}.")
        return bench, task
    if name in SYNTHETIC_TASKS:
        return "synthetic", name
    if name == continuation.CONTINUATION:
        return "continuation", name
    for bench in ("longbench", "choubun"):  # InfiniteBench names overlap the synthetic ones: prefix them
        if name in _BENCH_TASKS[bench]:
            return bench, name
    raise ValueError(
        f"Unknown task {name!r}. Synthetic: {', '.join(SYNTHETIC_TASKS)}; {continuation.CONTINUATION}; benchmarks as "
        f"longbench:<task>, infinitebench:<task>, choubun:<task>; or a path to a .jsonl file."
    )


def is_synthetic(name: str) -> bool:
    return resolve_task(name)[0] == "synthetic"


def has_splits(name: str) -> bool:
    """Whether the task is generated offline with train / test splits (synthetic and continuation)."""
    return resolve_task(name)[0] in ("synthetic", "continuation")


def load_task(
    name: str,
    tokenizer=None,
    *,
    length: int | None = None,
    n: int | None = None,
    seed: int = 0,
    split: str = "test",
    filler: str = "prose",
    data_dir: str | Path | None = None,
    continuation_tokens: int | None = None,
) -> list[Sample]:
    """Samples of task ``name``.

    Synthetic and continuation tasks are generated with ``n`` samples (default 1) whose prompts
    have ``length`` tokens (required); the continuation's answer is the next
    ``continuation_tokens`` tokens (default 64). Benchmark and JSONL tasks read at most ``n``
    records; ``length``, when given, is the prompt budget in tokens their prompts are
    middle-truncated to.
    """
    kind, task = resolve_task(name)
    if continuation_tokens is not None and kind != "continuation":
        raise ValueError(f"continuation_tokens only applies to the continuation task, not {name!r}.")
    if kind in ("synthetic", "continuation") and length is None:
        raise ValueError(f"Task {task!r} needs a length in tokens (e.g. --lengths 2048).")
    if kind == "continuation":
        return continuation.generate(tokenizer, length, n=n or 1, seed=seed, split=split, filler=filler,
                                     continuation_tokens=continuation_tokens or 64)
    if kind == "synthetic":
        return generate(task, tokenizer, length, n=n or 1, seed=seed, split=split, filler=filler)
    if kind == "jsonl":
        return load_jsonl_task(task, tokenizer, max_prompt_tokens=length, n=n)
    return _LOADERS[kind](task, tokenizer, max_prompt_tokens=length, n=n, data_dir=data_dir)
