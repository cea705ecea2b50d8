"""ChouBun (SakanaAI, released with the NAMM paper): Japanese long-context QA and summarisation.

Four tasks: ``wiki_qa``, ``edinet_qa``, ``corp_sec_qa`` (64 new tokens, ``qa_f1_ja``) and
``corp_sec_sum`` (128 new tokens, ``rouge_ja``), with the Japanese prompt templates of the
reference code (``namm/data/choubun.json``). Records use the LongBench schema and load from
``data_dir/<task>.jsonl`` or the Hub (``SakanaAI/ChouBun``, test split). The metrics tokenise with
MeCab through ``fugashi`` (install ``namm[bench]``).
"""

from __future__ import annotations

from pathlib import Path

from namm.tasks.base import Sample
from namm.tasks.longbench import benchmark_config, longbench_samples

__all__ = ["CHOUBUN_TASKS", "choubun_samples"]

CHOUBUN_TASKS: tuple[str, ...] = tuple(benchmark_config("choubun")["tasks"])


def choubun_samples(
    task: str,
    tokenizer=None,
    max_prompt_tokens: int | None = None,
    n: int | None = None,
    data_dir: str | Path | None = None,
) -> list[Sample]:
    """Samples of a ChouBun task, middle-truncated to ``max_prompt_tokens`` like LongBench."""
    return longbench_samples(task, tokenizer, max_prompt_tokens, n, data_dir, benchmark="choubun")
