"""The continuation task: prose of the requested length, its true next tokens as the answer, splits
on different books; a likelihood objective that `namm eval` refuses."""

from __future__ import annotations

import pytest

from namm.evaluation import EvalConfig
from namm.models import byte_tokenizer
from namm.tasks import load_task, resolve_task
from namm.tasks.filler import prose_chapters


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_prompt_length_and_answer_is_the_text_that_follows(tok):
    samples = load_task("continuation", tok, length=1500, n=3, seed=1, split="train", continuation_tokens=64)
    assert resolve_task("continuation") == ("continuation", "continuation")
    train_text = " ".join(prose_chapters("train"))
    for s in samples:
        n = len(tok(s.prompt)["input_ids"])
        assert 1500 - 200 <= n <= 1500 and s.meta["prompt_tokens"] == n
        (answer,) = s.answers
        assert len(tok(answer, add_special_tokens=False)["input_ids"]) == 64  # bytes: 64 characters
        assert (s.prompt + answer) in train_text  # the held-back continuation of the same passage
        assert s.metric == "loglik" and s.meta["no_chat"] and s.prompt == s.context
    assert len({s.prompt for s in samples}) == 3
    again = load_task("continuation", tok, length=1500, n=3, seed=1, split="train", continuation_tokens=64)
    assert [s.prompt for s in again] == [s.prompt for s in samples]
    test = load_task("continuation", tok, length=1500, n=3, seed=1, split="test")
    assert not {b for s in samples for b in s.meta["books"]} & {b for s in test for b in s.meta["books"]}


def test_clear_errors(tok):
    with pytest.raises(ValueError, match="filler must be 'prose'"):
        load_task("continuation", tok, length=500, filler="noise")
    with pytest.raises(ValueError, match="needs a length"):
        load_task("continuation", tok)
    with pytest.raises(ValueError, match="only applies to the continuation task"):
        load_task("passkey", tok, length=500, continuation_tokens=8)
    with pytest.raises(ValueError, match="likelihood objective"):
        EvalConfig(tasks=["continuation"], methods=["full"])
