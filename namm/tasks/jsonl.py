"""Reading task records: local JSONL files (offline) or the Hugging Face ``datasets`` library.

A local file holds one JSON object a line, in the benchmark's own schema (LongBench and ChouBun:
``input``, ``context``, ``answers``, ``all_classes``, ``_id``; InfiniteBench: ``id``, ``context``,
``input``, ``answer``, ``options``), or in namm's :class:`~namm.tasks.base.Sample` schema. Files
in a generic schema load too (see :func:`load_jsonl_task`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from namm.tasks.base import Sample, middle_truncate
from namm.tasks.metrics import METRICS

__all__ = ["read_jsonl", "write_jsonl", "benchmark_records", "load_jsonl_task", "truncate_sample"]

GENERIC_TEMPLATE = "{context}\n\nQuestion: {input}\nAnswer:"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; blank lines are skipped, a malformed line is reported by number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No JSONL file at {path}.")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number} is not valid JSON ({exc.msg}).") from exc
    return records


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    with Path(path).open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def benchmark_records(
    benchmark: str, task: str, hf_path: str, hf_name: str | None, hf_split: str,
    data_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Records of ``task``: ``data_dir/<task>.jsonl`` when given, else via ``datasets``."""
    if data_dir is not None:
        local = Path(data_dir) / f"{task}.jsonl"
        if not local.is_file():
            raise FileNotFoundError(f"{benchmark} task {task!r}: no {local}. Put {task}.jsonl in {data_dir}.")
        return read_jsonl(local)
    try:
        import datasets
    except ImportError as exc:
        raise RuntimeError(
            f"Loading {benchmark} from the Hugging Face Hub needs the 'datasets' package "
            f"(pip install 'namm[bench]'). Offline, download {task}.jsonl once and pass --data-dir DIR."
        ) from exc
    try:
        dataset = datasets.load_dataset(hf_path, hf_name, split=hf_split)
    except Exception as exc:  # network, missing config, removed loading script, ...
        raise RuntimeError(
            f"Could not load {benchmark} task {task!r} from {hf_path} ({type(exc).__name__}: {exc}). "
            f"Without internet, use a local copy: --data-dir DIR holding {task}.jsonl."
        ) from exc
    return [dict(row) for row in dataset]


def load_jsonl_task(
    path: str | Path, tokenizer=None, max_prompt_tokens: int | None = None, n: int | None = None,
    metric: str = "qa_f1", max_new_tokens: int = 64, template: str = GENERIC_TEMPLATE,
) -> list[Sample]:
    """Samples from a local JSONL file.

    Records with ``prompt`` and ``metric`` are namm samples and load as they are. Other records
    need ``context`` and ``answers`` (or ``answer``), with ``input`` or ``question``; their prompt
    is ``template`` filled with them, and a record's own ``metric`` / ``max_new_tokens`` win over
    the arguments. ``max_prompt_tokens`` middle-truncates prompts (needs ``tokenizer``).
    """
    path = Path(path)
    samples = []
    for index, record in enumerate(read_jsonl(path)[:n]):
        if "prompt" in record and "metric" in record:
            sample = Sample.from_dict({"id": f"{path.stem}-{index}", "task": path.stem, "context": "",
                                       "question": "", "answers": [], "max_new_tokens": max_new_tokens,
                                       **record})
        else:
            sample = _generic_sample(record, path.stem, index, metric, max_new_tokens, template)
        if sample.metric not in METRICS:
            raise ValueError(f"{path}: record {index} names unknown metric {sample.metric!r}.")
        samples.append(sample)
    return [truncate_sample(s, tokenizer, max_prompt_tokens) for s in samples]


def _generic_sample(record: dict, task: str, index: int, metric: str, max_new: int, template: str) -> Sample:
    answers = record.get("answers", record.get("answer"))
    if "context" not in record or answers is None:
        raise ValueError(f"{task}.jsonl record {index}: needs 'context' and 'answers' (or a 'prompt' and 'metric').")
    question = record.get("input", record.get("question", ""))
    answers = [str(a) for a in answers] if isinstance(answers, list) else [str(answers)]
    return Sample(
        id=str(record.get("_id", record.get("id", f"{task}-{index}"))), task=record.get("task", task),
        context=record["context"], question=question, answers=answers,
        metric=record.get("metric", metric), max_new_tokens=int(record.get("max_new_tokens", max_new)),
        prompt=template.format(context=record["context"], input=question),
        all_classes=record.get("all_classes"),
    )


def truncate_sample(sample: Sample, tokenizer, max_prompt_tokens: int | None) -> Sample:
    """The sample with its prompt middle-truncated to ``max_prompt_tokens`` (if given)."""
    if max_prompt_tokens is None:
        return sample
    if tokenizer is None:
        raise ValueError("Truncating prompts to a token budget needs the model's tokenizer.")
    sample.prompt = middle_truncate(sample.prompt, tokenizer, max_prompt_tokens)
    sample.length = max_prompt_tokens
    return sample
