"""Synthetic tasks: requested lengths hit, answers planted, reproducible, splits held out."""

from __future__ import annotations

import pytest

from namm.models import byte_tokenizer
from namm.tasks import SYNTHETIC_TASKS, load_task, score_sample
from namm.tasks.filler import prose_chapters

LENGTH = 1024
# the byte tokenizer counts characters; the longest filler unit is ~170 characters
TOLERANCE = 200


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_length_answers_and_reproducibility(task, tok):
    samples = load_task(task, tok, length=LENGTH, n=2, seed=3)
    assert len(samples) == 2
    for s in samples:
        n_tokens = len(tok(s.prompt)["input_ids"])
        assert LENGTH - TOLERANCE <= n_tokens <= LENGTH
        assert s.meta["prompt_tokens"] == n_tokens
        assert s.context in s.prompt and s.prompt.endswith(s.question)
        assert s.answers and all(a in s.context for a in s.answers)
        assert score_sample(s, " ".join(s.answers)) == 1.0
        assert score_sample(s, "I do not know.") == 0.0
    again = load_task(task, tok, length=LENGTH, n=2, seed=3)
    assert [s.prompt for s in again] == [s.prompt for s in samples]
    other_seed = load_task(task, tok, length=LENGTH, n=1, seed=4)
    assert other_seed[0].prompt != samples[0].prompt
    assert samples[0].id != samples[1].id and samples[0].prompt != samples[1].prompt


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_train_and_test_splits_differ(task, tok):
    train = load_task(task, tok, length=LENGTH, n=1, seed=0, split="train")[0]
    test = load_task(task, tok, length=LENGTH, n=1, seed=0, split="test")[0]
    assert train.answers != test.answers
    first_line = train.prompt.split("\n")[0]
    assert first_line != test.prompt.split("\n")[0]  # held-out instruction wording
    assert first_line not in test.prompt


def test_prose_splits_use_different_books():
    train, test = set(prose_chapters("train")), set(prose_chapters("test"))
    assert train and test and not train & test


def test_noise_filler_and_longer_lengths(tok):
    s = load_task("passkey", tok, length=3000, filler="noise")[0]
    assert "The grass is green. The sky is blue." in s.context
    assert 3000 - TOLERANCE <= len(tok(s.prompt)["input_ids"]) <= 3000


def test_frequent_words_answers_are_the_top_three(tok):
    s = load_task("frequent_words", tok, length=LENGTH, n=1)[0]
    words = s.context.split()
    counts = {w: words.count(w) for w in set(words)}
    top = sorted(counts, key=counts.get, reverse=True)[:4]
    assert top[:3] == s.answers and counts[top[2]] > counts[top[3]]


def test_bad_requests_raise_clear_errors(tok):
    with pytest.raises(ValueError, match="too short"):
        load_task("niah_multikey", tok, length=100)
    with pytest.raises(ValueError, match="needs a length"):
        load_task("passkey", tok)
    with pytest.raises(ValueError, match="Unknown task"):
        load_task("passkee", tok, length=LENGTH)
    with pytest.raises(ValueError, match="filler"):
        load_task("passkey", tok, length=LENGTH, filler="lorem")
