"""The dense objective for small models: continue held-back prose.

A sample is about ``length`` tokens of the shipped King James prose (:mod:`namm.tasks.filler`),
starting at a random sentence among the first ``MAX_OFFSET`` of a random chapter, as the prompt,
and the next ``continuation_tokens`` tokens of the same text as the reference answer. It is not
a generation task: evolution scores it by the teacher-forced log-likelihood of that continuation
under the compressed cache, relative to the full cache (:mod:`namm.evolution.fitness`), which
moves smoothly even when a small model answers every retrieval question wrong. The prompt is raw
text (never wrapped in a chat template), and the ``train`` and ``test`` splits read different
books with different random streams, like the synthetic tasks.
"""

from __future__ import annotations

import random

from namm.tasks.base import Sample
from namm.tasks.filler import FillerStream
from namm.tasks.synthetic import _fit_units

__all__ = ["CONTINUATION", "LOGLIK", "generate"]

CONTINUATION = "continuation"
LOGLIK = "loglik"  # the metric of a sample scored by the likelihood of its answer, not by generation
MAX_OFFSET = 32  # sentences a prompt may start into its chapter


def generate(tokenizer, length: int, n: int = 1, seed: int = 0, split: str = "test", filler: str = "prose",
             continuation_tokens: int = 64) -> list[Sample]:
    """``n`` samples: a prompt of at most (and close to) ``length`` tokens, the next tokens as the answer."""
    if filler != "prose":
        raise ValueError(f"The continuation task reads real prose; filler must be 'prose', got {filler!r}.")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    if not isinstance(length, int) or length <= 0:
        raise ValueError(f"length must be a positive number of tokens, got {length!r}.")
    if not isinstance(continuation_tokens, int) or continuation_tokens < 1:
        raise ValueError(f"continuation_tokens must be a positive integer, got {continuation_tokens!r}.")
    if tokenizer is None:
        raise ValueError("The continuation task needs the model's tokenizer to hit a length in tokens.")
    samples = []
    for index in range(n):
        rng = random.Random(f"namm-continuation|{split}|{seed}|{index}")
        stream = FillerStream("prose", split, rng)
        skip = rng.randrange(MAX_OFFSET)

        def n_tokens(k: int, stream: FillerStream = stream, skip: int = skip) -> int:
            return len(tokenizer(" ".join(stream.take(skip + k)[skip:]))["input_ids"])

        k = _fit_units(n_tokens, length, 1, CONTINUATION)
        context = " ".join(stream.take(skip + k)[skip:])
        answer = _next_tokens(tokenizer, stream, skip + k, continuation_tokens)
        samples.append(Sample(
            id=f"{CONTINUATION}-{split}-L{length}-s{seed}-{index}", task=CONTINUATION, context=context, question="",
            answers=[answer], metric=LOGLIK, prompt=context, max_new_tokens=continuation_tokens, length=length,
            meta={"prompt_tokens": n_tokens(k), "units": k, "filler": "prose", "split": split, "seed": seed,
                  "books": sorted(stream.books), "no_chat": True},
        ))
    return samples


def _next_tokens(tokenizer, stream: FillerStream, k: int, count: int) -> str:
    """The text of the first ``count`` tokens after the stream's first ``k`` units."""
    extra = 1
    while True:
        text = " " + " ".join(stream.take(k + extra)[k:])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= count:
            return tokenizer.decode(ids[:count])
        extra += 1
