"""InfiniteBench (Zhang et al., 2024, "∞Bench"): 12 tasks beyond 100K tokens.

Prompts are the reference's templates for base models (``yarn_mistral_templates`` in
OpenBMB/InfiniteBench ``src/prompt.py``), generation lengths its ``DATA_NAME_TO_MAX_NEW_TOKENS``;
both live in ``namm/data/infinitebench.json``. Scoring follows ``src/compute_scores.py``; the one
deviation is ``longbook_sum_eng``, scored with LongBench's ROUGE-L F here instead of the
``evaluate`` package's ROUGE-Lsum. Records (``id``, ``context``, ``input``, ``answer``,
``options``) load from ``data_dir/<task>.jsonl`` or the Hub (``xinrongzhang2022/InfiniteBench``,
one split per task), and are middle-truncated to the budget as the reference does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from namm.tasks.base import Sample
from namm.tasks.jsonl import benchmark_records, truncate_sample
from namm.tasks.longbench import benchmark_config
from namm.tasks.metrics import normalize_zh_answer, register_metric, token_f1

__all__ = ["INFINITEBENCH_TASKS", "infinitebench_samples"]

INFINITEBENCH_TASKS: tuple[str, ...] = tuple(benchmark_config("infinitebench")["tasks"])
_OPTIONS = "ABCD"


def _squeeze(pred: str, separators: tuple[str, ...]) -> str:
    """Separators replaced by spaces, runs of spaces collapsed (the reference's cleaning)."""
    for c in separators:
        pred = pred.replace(c, " ")
    return re.sub(" {2,}", " ", pred)


def _words(pred: str, separators: str) -> list[str]:
    return _squeeze(pred, tuple(separators)).split()


def first_int(pred: str, label: str, **_) -> float:
    """passkey / number_string: the first run of digits equals the label."""
    return float(next((item for item in re.split("[^0-9]", pred) if item), "") == label)


def kv_words(pred: str, label: str, **_) -> float:
    return float(label in _words(pred, "\n:\"'.,?!{}"))


def choice(pred: str, labels: list[str], **_) -> float:
    """longbook_choice_eng; ``labels`` = [option text, letter]."""
    if pred[:1] and pred[0] in _OPTIONS:
        return float(pred[0] in labels)
    pred = _squeeze(pred, ("\n", '"', "'", ".", ",", "?", "!", "{", "}"))
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        after = pred[idx + len(prefix) + 1:]
        return float(len(pred) >= idx + len(prefix) + 1 and any(after.startswith(s) for s in labels))
    for word in pred.split():
        if word in _OPTIONS:  # the reference tests substring membership in "ABCD"
            return float(word in labels)
    return 0.0


def dialogue(pred: str, labels: list[str], **_) -> float:
    return float(labels[0] in [w.upper() for w in _words(pred, "\n:\"'.,?!{}")])


def qa_f1_zh_char(pred: str, label: str, **_) -> float:
    """longbook_qa_chn: F1 over characters after the Chinese normalisation."""
    return token_f1(list(normalize_zh_answer(pred)), list(normalize_zh_answer(label)))


def math_find(pred: str, label: str, **_) -> float:
    found = re.search(r"\d+\.\d+|\d+", pred)
    if found is None:
        return 0.0
    return float(float(found.group(0)) == float(label))


def math_calc(pred: str, labels: list[str], **_) -> float:
    """Share of the intermediate values right, counted until the first mistake."""
    numbers = [int(item) for item in re.split("[^0-9]", pred) if item]
    right = 0
    for got, want in zip(numbers, labels):
        if got != int(want):
            break
        right += 1
    return right / len(labels) if labels else 0.0


def code_run(pred: str, label: str, **_) -> float:
    words = _words(pred.strip(), "\n.`'\":")
    try:
        return float(bool(words) and int(words[-1]) == int(label))
    except ValueError:
        return 0.0


def code_debug(pred: str, labels: list[str], **_) -> float:
    """``labels`` = [function name, letter]."""
    fn_name, letter = labels[0], labels[1]
    if pred[:2] in (f"{letter}.", f"{letter}:"):
        return 1.0
    pred = _squeeze(pred.strip(), ("\n", "`", "'", '"', "-", "*", "Option", "option"))
    for prefix in ("answer is:", "is:", "answer:"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return 0.0
        after = pred[idx + len(prefix) + 1:]
        return float(after.startswith(letter) or after.startswith(fn_name))
    return 0.0


for _name, _fn in {"inf_first_int": first_int, "inf_kv": kv_words, "inf_qa_f1_zh_char": qa_f1_zh_char,
                   "inf_math_find": math_find, "inf_code_run": code_run}.items():
    register_metric(_name, _fn)
for _name, _fn in {"inf_choice": choice, "inf_dialogue": dialogue, "inf_math_calc": math_calc,
                   "inf_code_debug": code_debug}.items():
    register_metric(_name, _fn, over="all")


def _prompt(task: str, template: str, record: dict[str, Any]) -> str:
    options = dict(zip(("OPTION_A", "OPTION_B", "OPTION_C", "OPTION_D"), record.get("options") or [""] * 4))
    question = record.get("input", "")
    fields = {"context": record["context"], "input": question, "question": question, **options}
    if task == "code_run":
        fields.update(func=question.split("(")[0].strip(), func_call=question.strip())
    if task == "math_find":
        target = re.findall(r"The \w+ number", question)
        fields["prompt"] = f"What is {target[0].lower()} in the following list?" if target else ""
    return template.format(**fields)


def _labels(task: str, record: dict[str, Any]) -> list[str]:
    answer = record.get("answer")
    answers = [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]
    if task in ("longbook_choice_eng", "code_debug") and record.get("options"):
        if len(answers) == 2 and answers[1] in _OPTIONS:
            return answers
        return [answers[0], _OPTIONS[list(record["options"]).index(answers[0])]]
    return answers


def infinitebench_samples(
    task: str,
    tokenizer=None,
    max_prompt_tokens: int | None = None,
    n: int | None = None,
    data_dir: str | Path | None = None,
) -> list[Sample]:
    config = benchmark_config("infinitebench")
    if task not in config["tasks"]:
        raise ValueError(f"Unknown InfiniteBench task {task!r}; known: {', '.join(config['tasks'])}.")
    spec = config["tasks"][task]
    records = benchmark_records("infinitebench", task, config["hf_path"], None, task, data_dir)
    samples = [
        Sample(id=str(r.get("id", i)), task=task, context=r["context"], question=r.get("input", ""),
               answers=_labels(task, r), metric=spec["metric"], prompt=_prompt(task, spec["prompt"], r),
               max_new_tokens=spec["max_new_tokens"], meta={"benchmark": "infinitebench"})
        for i, r in enumerate(records[:n] if n else records)
    ]
    return [truncate_sample(s, tokenizer, max_prompt_tokens) for s in samples]
