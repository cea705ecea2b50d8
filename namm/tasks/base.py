"""What every task produces (:class:`Sample`), how a prediction is scored, and LongBench's middle
truncation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from namm.tasks.metrics import METRICS

__all__ = ["Sample", "score_sample", "middle_truncate", "count_tokens"]


@dataclass
class Sample:
    """One prompt of a task, ready to feed to the engine.

    prompt:         the full text fed to the model (template filled with context and question).
    answers:        reference answers; the metric keeps the best match (or uses all of them).
    metric:         a name in :data:`namm.tasks.metrics.METRICS`.
    max_new_tokens: the task's generation length.
    all_classes:    label set for classification tasks (LongBench trec / lsht).
    stop:           strings that end generation early (LongBench samsum stops at a newline).
    first_line:     score only the first line of the prediction (trec, triviaqa, samsum, lsht).
    length:         the prompt length in tokens the sample was built or truncated for, if any.
    """

    id: str
    task: str
    context: str
    question: str
    answers: list[str]
    metric: str
    prompt: str
    max_new_tokens: int
    all_classes: list[str] | None = None
    stop: list[str] | None = None
    first_line: bool = False
    length: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Sample":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def score_sample(sample: Sample, prediction: str) -> float:
    """Score ``prediction`` against the sample's answers with its metric, in [0, 1]."""
    if sample.metric not in METRICS:
        raise ValueError(f"Unknown metric {sample.metric!r}; known: {', '.join(sorted(METRICS))}.")
    metric = METRICS[sample.metric]
    if sample.first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    if metric.over == "all":
        return float(metric.fn(prediction, list(sample.answers), all_classes=sample.all_classes))
    best = 0.0
    for answer in sample.answers:
        best = max(best, float(metric.fn(prediction, answer, all_classes=sample.all_classes)))
    return best


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` without special tokens (BOS and the like)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def middle_truncate(text: str, tokenizer, max_tokens: int) -> str:
    """LongBench's truncation: if ``text`` is longer than ``max_tokens`` tokens (no special
    tokens), keep the first and the last ``max_tokens // 2`` tokens, decoded and joined."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2 to keep a head and a tail, got {max_tokens}.")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    half = max_tokens // 2
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return head + tail
