"""Synthetic long-context tasks, generated offline from a seed at a requested length in tokens.

RULER-style (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?") retrieval, tracking and aggregation tasks plus a passkey test and a two-hop
question over planted facts. The haystack is shipped public-domain prose or RULER's noise
sentences (:mod:`namm.tasks.filler`).

The prompt (template, context, question, answer prefix) is grown unit by unit (filler sentences,
key-value pairs or words) until one more unit would pass ``length`` tokens as the model's own
tokenizer counts them (special tokens included). The ``train`` and ``test`` splits use different
random streams, different wordings (instruction, needle and question) and, for prose, different
books, so a held-out evaluation never reuses what evolution saw.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Callable

from namm.tasks.base import Sample
from namm.tasks.filler import FillerStream
from namm.tasks.synthetic_templates import TEMPLATES

__all__ = ["SYNTHETIC_TASKS", "generate"]

SYNTHETIC_TASKS = (
    "passkey", "niah_single", "niah_multikey", "niah_multivalue",
    "kv_retrieval", "variable_tracking", "frequent_words", "multihop",
)


@dataclass
class _Plan:
    """A task instance before its length is fixed: ``context(k)`` is the context built from ``k``
    units, answers and texts do not depend on ``k``."""

    context: Callable[[int], str]
    question: str
    answer_prefix: str
    answers: list[str]
    metric: str
    max_new_tokens: int
    min_units: int = 0


# -- random material ----------------------------------------------------------------------------

_CONSONANTS, _VOWELS = "bdfghklmnprstvz", "aeiou"


def _pseudo_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def _unique_words(rng: random.Random, n: int, syllables: tuple[int, int] = (2, 3)) -> list[str]:
    seen: dict[str, None] = {}
    while len(seen) < n:
        seen.setdefault(_pseudo_word(rng, rng.randint(*syllables)), None)
    return list(seen)


def _numbers(rng: random.Random, n: int, digits: int) -> list[str]:
    values: dict[str, None] = {}
    while len(values) < n:
        values.setdefault(str(rng.randrange(10 ** (digits - 1), 10**digits)), None)
    return list(values)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _with_needles(units: list[str], needles: list[tuple[float, str]]) -> list[str]:
    """Insert ``(depth, text)`` needles between units, at ``depth`` of the way through."""
    out, k = list(units), len(units)
    for offset, (depth, text) in enumerate(sorted(needles, key=lambda item: item[0])):
        out.insert(round(depth * k) + offset, text)
    return out


def _haystack(stream: FillerStream, needles: list[tuple[float, str]]) -> Callable[[int], str]:
    return lambda k: " ".join(_with_needles(stream.take(k), needles))


# -- tasks ----------------------------------------------------------------------------------------


def _passkey(rng, t, stream) -> _Plan:
    key = _numbers(rng, 1, 5)[0]
    needle = t["needle"].format(key=key)
    return _Plan(_haystack(stream, [(rng.random(), needle)]), t["question"], t["prefix"], [key], "string_match", 12)


def _niah(rng, t, stream, keys: int, values: int) -> _Plan:
    names = _unique_words(rng, keys)
    numbers = _numbers(rng, keys * values, 7)
    pairs = [(name, numbers[i * values + j]) for i, name in enumerate(names) for j in range(values)]
    needles = [(rng.random(), t["needle"].format(key=k, value=v)) for k, v in pairs]
    target = names[0]
    answers = [v for k, v in pairs if k == target]
    metric = "string_match_all" if values > 1 else "string_match"
    question = t["question"].format(key=target)
    return _Plan(_haystack(stream, needles), question, t["prefix"].format(key=target), answers, metric,
                 24 * values)


def _kv_retrieval(rng, t, stream) -> _Plan:
    key, value, depth = _uuid(rng), _uuid(rng), rng.random()
    pair_rng, pairs = random.Random(rng.random()), []

    def context(k: int) -> str:
        while len(pairs) < k:
            pairs.append(f'"{_uuid(pair_rng)}": "{_uuid(pair_rng)}"')
        return "{" + ", ".join(_with_needles(pairs[:k], [(depth, f'"{key}": "{value}"')])) + "}"

    return _Plan(context, t["question"].format(key=key), t["prefix"].format(key=key), [value], "string_match", 48)


def _variable_tracking(rng, t, stream) -> _Plan:
    names = [n.upper() for n in _unique_words(rng, 5, (2, 3))]
    value = _numbers(rng, 1, 5)[0]
    lines = [t["needle_value"].format(var=names[0], value=value)]
    lines += [t["needle_copy"].format(var=b, source=a) for a, b in zip(names, names[1:])]
    depths = sorted(rng.random() for _ in lines)
    # equal depths would keep order anyway (stable insert), but nudge to keep the chain readable
    needles = [(d + i * 1e-9, line) for i, (d, line) in enumerate(zip(depths, lines))]
    return _Plan(_haystack(stream, needles), t["question"].format(value=value),
                 t["prefix"].format(value=value, count=len(names)), names, "string_match_all", 32)


def _frequent_words(rng, t, stream) -> _Plan:
    word_rng = random.Random(rng.random())
    pool = _unique_words(word_rng, 3, (2, 3))
    shuffle_seed = rng.random()

    def counts(k: int) -> list[int]:
        a3 = max(3, round(0.05 * k))
        a2 = a3 + max(1, round(0.02 * k))
        a1 = a2 + max(1, round(0.02 * k))
        return [a1, a2, a3]

    def context(k: int) -> str:
        top = counts(k)
        rest = k - sum(top)
        n_other = -(-rest // (top[2] - 1)) if rest > 0 else 0  # each other word appears < a3 times
        while len(pool) < 3 + n_other:  # one word at a time: the pool is a fixed stream
            word = _pseudo_word(word_rng, word_rng.randint(2, 3))
            if word not in pool:
                pool.append(word)
        words = [w for w, c in zip(pool[:3], top) for _ in range(c)]
        words += [pool[3 + i % n_other] for i in range(rest)] if n_other else []
        random.Random(f"{shuffle_seed}-{k}").shuffle(words)
        return " ".join(words)

    return _Plan(context, t["question"], t["prefix"], pool[:3], "string_match_all", 32, min_units=40)


def _multihop(rng, t, stream) -> _Plan:
    people = [w.capitalize() for w in _unique_words(rng, 4, (2, 3))]
    cities = [w.capitalize() for w in _unique_words(rng, 4, (3, 3))]
    countries = [w.capitalize() for w in _unique_words(rng, 4, (2, 2))]
    facts = []
    for person, city, country in zip(people, cities, countries):
        facts.append((rng.random(), t["fact_home"].format(person=person, city=city)))
        facts.append((rng.random(), t["fact_place"].format(city=city, country=country)))
    return _Plan(_haystack(stream, facts), t["question"].format(person=people[0]),
                 t["prefix"].format(person=people[0]), [countries[0]], "string_match", 16)


_BUILDERS: dict[str, Callable[..., _Plan]] = {
    "passkey": _passkey,
    "niah_single": lambda rng, t, s: _niah(rng, t, s, keys=1, values=1),
    "niah_multikey": lambda rng, t, s: _niah(rng, t, s, keys=4, values=1),
    "niah_multivalue": lambda rng, t, s: _niah(rng, t, s, keys=1, values=4),
    "kv_retrieval": _kv_retrieval,
    "variable_tracking": _variable_tracking,
    "frequent_words": _frequent_words,
    "multihop": _multihop,
}


# -- length fitting -------------------------------------------------------------------------------


def _prompt(instruction: str, context: str, question: str, prefix: str) -> str:
    return f"{instruction}\n\n{context}\n\n{question}\n{prefix}"


def _fit_units(n_tokens: Callable[[int], int], target: int, k_min: int, task: str) -> int:
    """Largest ``k >= k_min`` with ``n_tokens(k) <= target`` (n_tokens grows with k)."""
    base = n_tokens(k_min)
    if base > target:
        raise ValueError(
            f"{task}: a prompt of {target} tokens is too short; the template, question and needles "
            f"alone take {base} tokens. Ask for a longer length."
        )
    probe = k_min + 32
    per_unit = max((n_tokens(probe) - base) / 32, 0.5)
    guess = max(k_min, k_min + int((target - base) / per_unit))
    step = max(1, guess // 64)
    lo, hi = k_min, None
    if n_tokens(guess) <= target:
        lo = guess
        while hi is None:
            nxt = lo + step
            if n_tokens(nxt) <= target:
                lo, step = nxt, step * 2
            else:
                hi = nxt
    else:
        hi = guess
        while True:
            nxt = max(k_min, hi - step)
            if n_tokens(nxt) <= target:
                lo = nxt
                break
            hi, step = nxt, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if n_tokens(mid) <= target else (lo, mid)
    return lo


def generate(
    task: str,
    tokenizer,
    length: int,
    n: int = 1,
    seed: int = 0,
    split: str = "test",
    filler: str = "prose",
) -> list[Sample]:
    """``n`` samples of ``task`` whose prompts are at most (and close to) ``length`` tokens."""
    if task not in _BUILDERS:
        raise ValueError(f"Unknown synthetic task {task!r}; known: {', '.join(SYNTHETIC_TASKS)}.")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    if not isinstance(length, int) or length <= 0:
        raise ValueError(f"length must be a positive number of tokens, got {length!r}.")
    if tokenizer is None:
        raise ValueError("Synthetic tasks need the model's tokenizer to hit a length in tokens.")
    template = TEMPLATES[task][split]
    samples = []
    for index in range(n):
        rng = random.Random(f"namm-synthetic|{task}|{split}|{seed}|{index}")
        stream = FillerStream(filler, split, random.Random(rng.random()))
        plan = _BUILDERS[task](rng, template, stream)

        def render(k: int, plan: _Plan = plan) -> str:
            return _prompt(template["instruction"], plan.context(k), plan.question, plan.answer_prefix)

        def n_tokens(k: int) -> int:
            return len(tokenizer(render(k))["input_ids"])

        k = _fit_units(n_tokens, length, plan.min_units, task)
        context = plan.context(k)
        prompt = render(k)
        samples.append(Sample(
            id=f"{task}-{split}-L{length}-s{seed}-{index}", task=task, context=context,
            question=f"{plan.question}\n{plan.answer_prefix}", answers=plan.answers, metric=plan.metric,
            prompt=prompt, max_new_tokens=plan.max_new_tokens, length=length,
            meta={"prompt_tokens": n_tokens(k), "units": k, "filler": filler, "split": split, "seed": seed,
                  "books": sorted(stream.books)},
        ))
    return samples
