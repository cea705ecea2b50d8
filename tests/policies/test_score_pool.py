"""``score_pool``: a NAMM's scores max-pooled along the cache before selection keep spans whole."""

from __future__ import annotations

import json

import pytest
import torch

from namm.memory.model import NAMM, NAMMConfig
from namm.memory.selection import pool_scores
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
