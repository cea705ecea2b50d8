"""LongBench v1 (Bai et al., 2023): 21 tasks with the official prompts, generation lengths,
metrics and middle truncation.

The prompt templates, per-task ``max_new_tokens`` and metric names live in
``namm/data/longbench.json`` (taken from THUDM/LongBench ``config/dataset2prompt.json``,
``config/dataset2maxlen.json`` and ``eval.py``). As in the official evaluation: no chat template
for trec, triviaqa, samsum, lsht, lcc and repobench-p; samsum stops at a newline; trec,
triviaqa, samsum and lsht are scored on the first line of the answer; a prompt longer than the
budget keeps its first and last halves (by tokens).

Records come from ``data_dir/<task>.jsonl`` (offline) or the Hub via ``datasets``
(``THUDM/LongBench``, test split). ChouBun (:mod:`namm.tasks.choubun`) shares the schema and this
loader.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from namm.tasks.base import Sample
from namm.tasks.jsonl import benchmark_records, truncate_sample

__all__ = ["LONGBENCH_TASKS", "benchmark_config", "longbench_samples", "records_to_samples"]

_DATA = Path(__file__).resolve().parent.parent / "data"


@lru_cache(maxsize=None)
def benchmark_config(name: str) -> dict[str, Any]:
    """The shipped config of a benchmark (``longbench``, ``choubun`` or ``infinitebench``)."""
    return json.loads((_DATA / f"{name}.json").read_text(encoding="utf-8"))


LONGBENCH_TASKS: tuple[str, ...] = tuple(benchmark_config("longbench")["tasks"])


def records_to_samples(benchmark: str, task: str, records: list[dict[str, Any]]) -> list[Sample]:
    """LongBench-schema records (``input``, ``context``, ``answers``, ``all_classes``, ``_id``)
    turned into samples with the benchmark's prompt for ``task``."""
    config = benchmark_config(benchmark)
    spec = config["tasks"][task]
    samples = []
    for index, record in enumerate(records):
        missing = [key for key in ("context", "answers") if key not in record]
        if missing:
            raise ValueError(f"{benchmark} {task} record {index} lacks {', '.join(missing)}.")
        question = record.get("input") or ""
        answers = record["answers"] if isinstance(record["answers"], list) else [record["answers"]]
        samples.append(Sample(
            id=str(record.get("_id") or f"{task}-{index}"), task=task, context=record["context"],
            question=question, answers=[str(a) for a in answers], metric=spec["metric"],
            prompt=spec["prompt"].format(context=record["context"], input=question),
            max_new_tokens=spec["max_new_tokens"], all_classes=record.get("all_classes") or None,
            stop=config.get("stop", {}).get(task), first_line=task in config.get("first_line", ()),
            meta={"benchmark": benchmark, "no_chat": task in config.get("no_chat", ()),
                  "length": record.get("length")},
        ))
    return samples


def longbench_samples(
    task: str,
    tokenizer=None,
    max_prompt_tokens: int | None = None,
    n: int | None = None,
    data_dir: str | Path | None = None,
    benchmark: str = "longbench",
) -> list[Sample]:
    """Samples of a LongBench (or ChouBun) task, middle-truncated to ``max_prompt_tokens``.

    The official budget is the model's window minus the task's ``max_new_tokens``; pass that
    (or any smaller length) as ``max_prompt_tokens``.
    """
    config = benchmark_config(benchmark)
    if task not in config["tasks"]:
        raise ValueError(f"Unknown {benchmark} task {task!r}; known: {', '.join(config['tasks'])}.")
    hf_name = task
    records = benchmark_records(benchmark, task, config["hf_path"], hf_name, config["hf_split"], data_dir)
    samples = records_to_samples(benchmark, task, records[:n] if n else records)
    return [truncate_sample(s, tokenizer, max_prompt_tokens) for s in samples]
