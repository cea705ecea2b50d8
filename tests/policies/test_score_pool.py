"""``score_pool`` and ``score_carry``: a NAMM's scores pooled along the cache (both sides) or carried to the
tokens after a strong one, before selection, keep spans whole."""

from __future__ import annotations

import json

import pytest
import torch

from namm.memory.model import NAMM, NAMMConfig
from namm.memory.selection import carry_scores, pool_scores
from namm.policies.namm import NAMMPolicy
from tests.policies.test_namm_extras import extras_namm, feed, fresh


def test_pool_scores_by_hand() -> None:
    scores = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0, 1.0, 0.0], [3.0, -1.0, -2.0, -3.0, -4.0, -5.0, 2.0]])
    assert pool_scores(scores, 1) is scores
    assert pool_scores(scores, 3).tolist() == [[5, 5, 5, 0, 1, 1, 1], [3, 3, -1, -2, -3, 2, 2]]
    assert pool_scores(scores, 5).tolist() == [[5, 5, 5, 5, 1, 1, 1], [3, 3, 3, -1, 2, 2, 2]]
    # padded slots (held False) neither lend their score to a neighbour nor take one
    held = torch.tensor([[True] * 7, [False, True, True, True, True, True, True]])
    assert pool_scores(scores, 3, held).tolist() == [[5, 5, 5, 0, 1, 1, 1], [3, -1, -1, -2, -3, 2, 2]]
    with pytest.raises(ValueError, match="score_pool"):
        pool_scores(scores, 4)


@pytest.mark.parametrize("bad", [0, 2, -3, 1.0, True, "3"])
def test_score_pool_is_validated(bad) -> None:
    with pytest.raises(ValueError, match="score_pool"):
        NAMMConfig(score_pool=bad)


def test_folders_without_score_pool_load_unpooled_and_pooled_ones_round_trip(tmp_path) -> None:
    namm = extras_namm()
    namm.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["score_pool"]  # a folder saved before the field existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert NAMM.from_pretrained(tmp_path / "old").config.score_pool == 1
    namm.with_config(score_pool=5).save_pretrained(tmp_path / "pooled")
    assert NAMM.from_pretrained(tmp_path / "pooled").config.score_pool == 5


def _select(namm: NAMM, per_head: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scores one eviction step ranks (the score hook's) and the indices it keeps."""
    policy = fresh(NAMMPolicy(namm, per_head=per_head))
    recorded = []
    policy.score_hook = lambda layer, positions, scores: recorded.append(scores.clone())
    feed(policy)
    policy.begin_eviction()
    keep = policy.select(0)
    return recorded[0], keep


@pytest.mark.parametrize("per_head", [False, True])
def test_a_pooled_namm_ranks_its_pooled_scores_and_keeps_the_neighbours(per_head: bool) -> None:
    namm = extras_namm(scale=0.6)
    plain, _ = _select(namm, per_head)
    threshold = float(plain[:, :-1].flatten().quantile(0.85))  # each head keeps a few strong tokens
    plain, kept_plain = _select(namm.with_config(threshold=threshold), per_head)
    pooled, kept_pooled = _select(namm.with_config(threshold=threshold, score_pool=3), per_head)
    assert torch.equal(pooled, pool_scores(plain, 3))  # the same inputs, pooled before selection
    assert kept_plain is not None and kept_pooled is not None  # both evict at this threshold
    n = plain.shape[-1]
    for head in range(plain.shape[0]):
        alone = {int(i) for i in kept_plain[head] if i >= 0}
        spans = {int(i) for i in kept_pooled[head] if i >= 0}
        strong = {i for i in range(n) if plain[head, i] >= threshold}
        neighbours = {j for i in strong for j in (i - 1, i, i + 1) if 0 <= j < n}
        assert strong <= alone and neighbours <= spans and len(spans) > len(alone)


def test_carry_scores_by_hand() -> None:
    scores = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0, 1.0, 0.0], [3.0, -1.0, -2.0, -3.0, -4.0, -5.0, 2.0]])
    assert carry_scores(scores, 0, 1.0) is scores
    # causal: only the tokens after a strong one rise, by its score less 1.0 per token of distance
    assert carry_scores(scores, 2, 1.0).tolist() == [[0, 5, 4, 3, 0, 1, 0], [3, 2, 1, -3, -4, -5, 2]]
    assert carry_scores(scores, 3, 0.0).tolist() == [[0, 5, 5, 5, 5, 1, 1], [3, 3, 3, 3, -1, -2, 2]]
    assert carry_scores(scores, 10, 2.0).tolist() == [[0, 5, 3, 1, 0, 1, 0], [3, 1, -1, -3, -4, -5, 2]]
    # padded slots (held False) neither lend their score nor take one
    held = torch.tensor([[True] * 7, [False, True, True, True, True, True, True]])
    assert carry_scores(scores, 3, 0.0, held).tolist() == [[0, 5, 5, 5, 5, 1, 1], [3, -1, -1, -1, -1, -2, 2]]
    assert carry_scores(scores, 3, 0.0).dtype == scores.dtype and scores[0, 2] == 0  # not in place


@pytest.mark.parametrize("bad", [{"score_carry": -1}, {"score_carry": 1.0}, {"score_carry": True},
                                 {"score_carry": 2, "score_carry_decay": -0.5},
                                 {"score_carry": 2, "score_carry_decay": float("nan")},
                                 {"score_carry": 2, "score_carry_decay": "1"}])
def test_score_carry_is_validated(bad) -> None:
    with pytest.raises(ValueError, match="score_carry"):
        NAMMConfig(**bad)


def test_folders_without_score_carry_load_uncarried_and_carried_ones_round_trip(tmp_path) -> None:
    namm = extras_namm()
    namm.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["score_carry"], config["score_carry_decay"]  # a folder saved before the fields existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    old = NAMM.from_pretrained(tmp_path / "old").config
    assert (old.score_carry, old.score_carry_decay) == (0, 0.0)
    namm.with_config(score_carry=6, score_carry_decay=0.25).save_pretrained(tmp_path / "carried")
    new = NAMM.from_pretrained(tmp_path / "carried").config
    assert (new.score_carry, new.score_carry_decay) == (6, 0.25)


@pytest.mark.parametrize("per_head", [False, True])
def test_a_carrying_namm_keeps_the_tokens_after_its_strong_ones(per_head: bool) -> None:
    namm = extras_namm(scale=0.6)
    plain, _ = _select(namm, per_head)
    threshold = float(plain[:, :-1].flatten().quantile(0.85))
    plain, kept_plain = _select(namm.with_config(threshold=threshold), per_head)
    carried, kept_carried = _select(namm.with_config(threshold=threshold, score_carry=2), per_head)
    assert torch.equal(carried, carry_scores(plain, 2))  # the same inputs, carried before selection
    assert kept_plain is not None and kept_carried is not None
    n = plain.shape[-1]
    for head in range(plain.shape[0]):
        alone = {int(i) for i in kept_plain[head] if i >= 0}
        spans = {int(i) for i in kept_carried[head] if i >= 0}
        strong = {i for i in range(n) if plain[head, i] >= threshold}
        after = {j for i in strong for j in (i, i + 1, i + 2) if j < n}
        assert strong <= alone and after <= spans and len(spans) > len(alone)
        if per_head:  # (a shared count fills each head up to its layer's fullest by rank)
            assert spans == after  # every kept token is strong or within 2 after a strong one
