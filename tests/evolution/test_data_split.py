"""Training and evaluation data never overlap: the evolution's training pool vs its eval pool, and
the synthetic train split vs the held-out test split (prompt texts, filler books, templates, seeds)."""

from __future__ import annotations

import pytest

from namm.evolution.config import RunConfig
from namm.evolution.prompts import EVAL_SEED_OFFSET, PromptPools
from namm.models import byte_tokenizer
from namm.tasks import SYNTHETIC_TASKS, load_task
from namm.tasks.synthetic_templates import TEMPLATES

TASKS = ["passkey", "niah_single", "niah_multikey", "kv_retrieval", "continuation"]
PROSE = ["passkey", "niah_single", "niah_multikey", "continuation"]  # the tasks with a prose haystack


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def build(tok, eval_split: str) -> PromptPools:
    config = RunConfig.from_dict({
        "model": "tiny-llama", "seed": 3,
        "fitness": {"samples_per_task": 2, "eval_samples_per_task": 4, "eval_split": eval_split},
        "tasks": [{"name": t, "length": 900, "prompts": 8} for t in TASKS],
        "stages": [{"tasks": TASKS, "generations": 1}],
    })
    return PromptPools.build(config, tok)


def template_lines(task: str, split: str) -> list[str]:
    """The fixed wording of a task's split (instruction; needle / question stems before any slot)."""
    t = TEMPLATES[task][split]
    return [t["instruction"]] + [t[k].split("{")[0] for k in ("needle", "question") if k in t and t[k].split("{")[0]]


def seeds(prompts) -> set[tuple[str, int]]:
    return {(p.sample.meta["split"], p.sample.meta["seed"]) for p in prompts}


def books(prompts) -> set[str]:
    return {b for p in prompts for b in p.sample.meta["books"]}


@pytest.mark.parametrize("eval_split", ["test", "train"])
def test_evolution_eval_pool_is_disjoint_from_training(tok, eval_split):
    pools = build(tok, eval_split)
    for task in TASKS:
        train, held_out = pools.pools[task], pools.eval_pools[task]
        assert len(train) == 8 and len(held_out) == 4
        assert not {p.id for p in train} & {p.id for p in held_out}
        if eval_split == "test" or task != "continuation":  # continuation on "train" may reread a passage
            assert not {p.prompt for p in train} & {p.prompt for p in held_out}
            assert not {a for p in train for a in p.answers} & {a for p in held_out for a in p.answers}
        assert seeds(train) == {("train", 3)} and seeds(held_out) == {(eval_split, 3 + EVAL_SEED_OFFSET)}
        # every generation's draw comes from the training pool only
        drawn = [p for g in range(20) for p in pools.generation_batch(g, [task])]
        assert {p.id for p in drawn} <= {p.id for p in train}
        assert pools.calibration_batch()[0].id in {p.id for p in pools.pools["passkey"]}
    if eval_split == "test":  # held out in wording and filler too
        for task in PROSE:
            assert books(pools.pools[task]) and books(pools.eval_pools[task])
            assert not books(pools.pools[task]) & books(pools.eval_pools[task])
        for task in TASKS[:-1]:
            for line in template_lines(task, "train"):
                assert all(line not in p.prompt for p in pools.eval_pools[task]), (task, line)
            for line in template_lines(task, "test"):
                assert all(line not in p.prompt for p in pools.pools[task]), (task, line)


@pytest.mark.parametrize("task", [*SYNTHETIC_TASKS, "continuation"])
def test_train_and_test_splits_share_no_text_book_template_or_seed(tok, task):
    train = load_task(task, tok, length=900, n=4, seed=0, split="train")
    test = load_task(task, tok, length=900, n=4, seed=0, split="test")
    assert not {s.prompt for s in train} & {s.prompt for s in test}
    assert not {s.id for s in train} & {s.id for s in test}
    # the same seed number draws from other random streams: the RNG key names the split
    assert {(s.meta["split"], s.meta["seed"]) for s in train} == {("train", 0)}
    assert {(s.meta["split"], s.meta["seed"]) for s in test} == {("test", 0)}
    assert not {s.context for s in train} & {s.context for s in test}
    train_books, test_books = {b for s in train for b in s.meta["books"]}, {b for s in test for b in s.meta["books"]}
    assert not train_books & test_books
    if task != "continuation":
        for line in template_lines(task, "train"):
            assert all(line not in s.prompt for s in test), line
        for line in template_lines(task, "test"):
            assert all(line not in s.prompt for s in train), line
