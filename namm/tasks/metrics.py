"""Task metrics: the official LongBench definitions, ChouBun's Japanese variants, and the string
matches used by the synthetic (RULER-style) tasks.

Every metric takes ``(prediction, ground_truth, **kwargs)`` and returns a float in [0, 1]; a
sample's score is the best over its reference answers (see :func:`namm.tasks.base.score_sample`),
except for metrics registered with ``over="all"``, which see the whole answer list at once.

The LongBench functions follow THUDM/LongBench ``metrics.py`` exactly, quirks included (they are
what published numbers were computed with):

* ``qa_f1``: SQuAD normalisation (lower case, drop ASCII punctuation, drop the articles a/an/the,
  collapse whitespace), whitespace tokens, bag-of-tokens F1.
* ``rouge``: ROUGE-L F as the ``rouge`` package (pltrdy, v1.0.1) computes it: text split into
  "sentences" at every ".", summary-level union LCS, and -- unlike the textbook definition --
  precision and recall divided by the number of *distinct* words; any failure scores 0.
* ``classification``: classes named in the prediction, minus those that are substrings of the
  label; score 1/len(matches) if the label is among them. The official loop removes items from
  the list it iterates over, so the item right after a removed one is never examined; kept.
* ``code_sim``: first line without a backtick, ``#`` or ``//``, compared with ``fuzz.ratio``
  (``difflib.SequenceMatcher`` ratio x 100, rounded; equal strings 100, an empty one 0) / 100.

Chinese variants tokenise with ``jieba`` and Japanese ones (ChouBun, SakanaAI) with ``fugashi``
(MeCab, ``unidic-lite`` dictionary); both are optional and imported on first use.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

__all__ = [
    "METRICS", "Metric", "normalize_answer", "normalize_zh_answer", "qa_f1_score", "qa_f1_zh_score",
    "qa_f1_ja_score", "rouge_score", "rouge_zh_score", "rouge_ja_score", "rouge_l_f",
    "classification_score", "retrieval_score", "retrieval_zh_score", "count_score", "code_sim_score",
    "fuzz_ratio", "string_match", "string_match_all", "exact_match", "register_metric",
]

_CJK_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿"
    "–—‘’‛“”„‟…‧﹏."
)
_ASCII_PUNCT = frozenset(string.punctuation)
_ALL_PUNCT = frozenset(string.punctuation + _CJK_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# -- normalisation and token F1 -------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lower case, drop ASCII punctuation, drop articles, collapse whitespace (SQuAD style)."""
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lower case, drop ASCII and CJK punctuation, delete all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ALL_PUNCT).split())


def token_f1(prediction: list[str], ground_truth: list[str]) -> float:
    """Bag-of-tokens F1 (multiset overlap)."""
    same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _normalized_tokens(tokens: list[str]) -> list[str]:
    return [t for t in (normalize_zh_answer(tok) for tok in tokens) if t]


def qa_f1_zh_score(prediction: str, ground_truth: str, **_) -> float:
    cut = _jieba_cut()
    return token_f1(_normalized_tokens(cut(prediction)), _normalized_tokens(cut(ground_truth)))


def qa_f1_ja_score(prediction: str, ground_truth: str, **_) -> float:
    """ChouBun's token F1: MeCab surface forms, each normalised like Chinese, empties dropped."""
    split = _mecab_split()
    return token_f1(_normalized_tokens(split(prediction)), _normalized_tokens(split(ground_truth)))


# -- ROUGE-L --------------------------------------------------------------------------------------


def _rouge_sentences(text: str) -> list[str]:
    # the rouge package: split at ".", keep non-empty raw pieces, squeeze their whitespace
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _lcs_words(reference: list[str], candidate: list[str]) -> set[str]:
    """Words of one longest common subsequence, recovered by the package's backtracking rule."""
    n, m = len(reference), len(candidate)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, prev, ref_word = table[i], table[i - 1], reference[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if ref_word == candidate[j - 1] else max(prev[j], row[j - 1])
    words, i, j = set(), n, m
    while i > 0 and j > 0:
        if reference[i - 1] == candidate[j - 1]:
            words.add(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l_f(prediction: str, reference: str) -> float:
    """Summary-level ROUGE-L F1 with the ``rouge`` package's conventions (0 where it would fail)."""
    hyp, ref = _rouge_sentences(prediction), _rouge_sentences(reference)
    if not hyp or not ref:
        return 0.0
    hyp_words = {w for s in hyp for w in s.split(" ")}
    ref_words = {w for s in ref for w in s.split(" ")}
    union: set[str] = set()
    for ref_sentence in ref:
        ref_tokens = ref_sentence.split(" ")
        for hyp_sentence in hyp:
            union |= _lcs_words(ref_tokens, hyp_sentence.split(" "))
    recall, precision = len(union) / len(ref_words), len(union) / len(hyp_words)
    return 2.0 * (precision * recall) / (precision + recall + 1e-8)


def rouge_score(prediction: str, ground_truth: str, **_) -> float:
    return rouge_l_f(prediction, ground_truth)


def rouge_zh_score(prediction: str, ground_truth: str, **_) -> float:
    cut = _jieba_cut()
    return rouge_l_f(" ".join(cut(prediction)), " ".join(cut(ground_truth)))


def rouge_ja_score(prediction: str, ground_truth: str, **_) -> float:
    split = _mecab_split()
    return rouge_l_f(" ".join(split(prediction)), " ".join(split(ground_truth)))


# -- classification, retrieval, counting, code ---------------------------------------------------


def classification_score(prediction: str, ground_truth: str, all_classes: list[str] | None = None, **_) -> float:
    if not all_classes:
        raise ValueError("classification_score needs all_classes (the task's label set).")
    matches = [name for name in all_classes if name in prediction]
    i = 0
    while i < len(matches):  # same visiting order as the official remove-while-iterating loop
        term = matches[i]
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
        i += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _share_of_numbers_equal(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(number == target for number in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, ground_truth: str, **_) -> float:
    return _share_of_numbers_equal(prediction, str(ground_truth))


def retrieval_score(prediction: str, ground_truth: str, **_) -> float:
    found = re.findall(r"Paragraph (\d+)", ground_truth)
    return _share_of_numbers_equal(prediction, found[0]) if found else 0.0


def retrieval_zh_score(prediction: str, ground_truth: str, **_) -> float:
    found = re.findall(r"段落(\d+)", ground_truth)
    return _share_of_numbers_equal(prediction, found[0]) if found else 0.0


def fuzz_ratio(a: str, b: str) -> int:
    """``fuzzywuzzy.fuzz.ratio`` without python-Levenshtein: difflib similarity x 100, rounded."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, ground_truth: str, **_) -> float:
    first_code_line = ""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            first_code_line = line
            break
    return fuzz_ratio(first_code_line, ground_truth) / 100


# -- synthetic tasks ----------------------------------------------------------------------------


def string_match(prediction: str, ground_truth: str, **_) -> float:
    """1 if the reference occurs in the prediction, case-insensitive (RULER's part match)."""
    return float(ground_truth.lower() in prediction.lower())


def string_match_all(prediction: str, ground_truths: list[str], **_) -> float:
    """Share of the references that occur in the prediction (RULER's all-match)."""
    if not ground_truths:
        return 0.0
    pred = prediction.lower()
    return sum(ref.lower() in pred for ref in ground_truths) / len(ground_truths)


def exact_match(prediction: str, ground_truth: str, **_) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


# -- optional tokenisers --------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _jieba_cut() -> Callable[[str], list[str]]:
    try:
        import jieba
    except ImportError as exc:
        raise RuntimeError("Chinese metrics need jieba: pip install 'namm[bench]' (or pip install jieba).") from exc
    jieba.setLogLevel(60)
    return lambda text: list(jieba.cut(text, cut_all=False))


@lru_cache(maxsize=1)
def _mecab_split() -> Callable[[str], list[str]]:
    try:
        from fugashi import Tagger

        tagger = Tagger("-Owakati")
    except (ImportError, RuntimeError) as exc:
        raise RuntimeError(
            "Japanese metrics need fugashi with a dictionary: pip install 'namm[bench]' "
            "(or pip install fugashi unidic-lite)."
        ) from exc
    return lambda text: [word.surface for word in tagger(text)]


# -- registry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A named metric. ``over="each"``: scored per reference, best one kept; ``"all"``: given the
    whole reference list at once (multi-value answers)."""

    name: str
    fn: Callable[..., float]
    over: str = "each"


METRICS: dict[str, Metric] = {}


def register_metric(name: str, fn: Callable[..., float], over: str = "each") -> None:
    if over not in ("each", "all"):
        raise ValueError(f"over must be 'each' or 'all', got {over!r}.")
    METRICS[name] = Metric(name, fn, over)


for _name, _fn in {
    "qa_f1": qa_f1_score, "qa_f1_zh": qa_f1_zh_score, "qa_f1_ja": qa_f1_ja_score,
    "rouge": rouge_score, "rouge_zh": rouge_zh_score, "rouge_ja": rouge_ja_score,
    "classification": classification_score, "retrieval": retrieval_score,
    "retrieval_zh": retrieval_zh_score, "count": count_score, "code_sim": code_sim_score,
    "string_match": string_match, "exact_match": exact_match,
}.items():
    register_metric(_name, _fn)
register_metric("string_match_all", string_match_all, over="all")
