"""Fitness arithmetic (namm-algorithm.md section 5, bounded), prompt draws and the reference cache."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from namm.evolution.config import FitnessConfig
from namm.evolution.fitness import (MAX_RATIO, NO_EVIDENCE, PromptResult, answer_continuation, member_fitness,
                                   task_ratio)
from namm.evolution.prompts import Prompt, PromptPools, ReferenceScores


def prompts(tasks: dict[str, int], objective: str = "metric") -> list[Prompt]:
    return [Prompt(id=f"{t}:{i}", task=t, sample=None, objective=objective) for t, n in tasks.items() for i in range(n)]


def test_metric_ratio_counts_only_prompts_the_full_cache_solves():
    results = [PromptResult(score=s) for s in (1.0, 0.0, 1.0, 0.5)]
    refs = [PromptResult(score=s) for s in (1.0, 1.0, 0.0, 0.5)]
    # prompt 3 (full cache 0) does not count: (1 + 0 + 0.5) / (1 + 1 + 0.5)
    assert task_ratio("metric", results, refs) == pytest.approx(1.5 / 2.5)
    # an all-zero reference: no prompt counts, whatever the member scored (the reference gave 1e9)
    zeros = [PromptResult(score=0.0)] * 2
    assert task_ratio("metric", zeros, zeros) is None
    assert task_ratio("metric", [PromptResult(score=1.0), PromptResult(score=0.0)], zeros) is None
    # a member beating a weak full cache is capped
    weak = [PromptResult(score=0.1), PromptResult(score=0.0)]
    assert task_ratio("metric", [PromptResult(score=1.0), PromptResult(score=1.0)], weak) == MAX_RATIO


def test_loglik_ratio_is_geometric_mean_per_token_likelihood_ratio():
    results = [PromptResult(loglik=-10.0, tokens=5), PromptResult(loglik=-3.0, tokens=2)]
    refs = [PromptResult(loglik=-5.0, tokens=5), PromptResult(loglik=-4.0, tokens=2)]
    expected = math.exp(((-10 + 5) / 5 + (-3 + 4) / 2) / 2)
    assert task_ratio("loglik", results, refs) == pytest.approx(expected)
    assert task_ratio("loglik", refs, refs) == 1.0  # the full cache itself scores exactly 1
    better = [PromptResult(loglik=0.0, tokens=5), PromptResult(loglik=0.0, tokens=2)]
    assert task_ratio("loglik", better, refs) == pytest.approx(MAX_RATIO)  # exp(1.5) = 4.5, capped


def test_margin_ratio_is_a_smooth_exact_match_over_prompts_the_full_cache_answers():
    sig = lambda m: 1 / (1 + math.exp(-m))  # noqa: E731  (MARGIN_SCALE = 1 nat)
    refs = [PromptResult(margins=[3.0, 2.0]),     # the full cache's answer is the argmax at every token
            PromptResult(margins=[4.0, -0.5]),    # greedy would miss its second token: does not count
            PromptResult(margins=[1.0])]
    results = [PromptResult(margins=[3.0, -1.0]), PromptResult(margins=[9.0, 9.0]), PromptResult(margins=[0.0])]
    assert [r.argmax_answer for r in refs] == [True, False, True]
    # each prompt by its binding (smallest) margin
    expected = (sig(-1) + sig(0)) / (sig(2) + sig(1))
    assert task_ratio("margin", results, refs) == pytest.approx(expected)
    assert task_ratio("margin", refs, refs) == 1.0
    # one answer token pushed from the argmax costs more than the same log-likelihood spread thinly
    one_lost = [PromptResult(margins=[3.0, -2.0]), refs[1], refs[2]]
    spread = [PromptResult(margins=[0.5, 0.5]), refs[1], refs[2]]  # the same summed margin (+1)
    assert task_ratio("margin", one_lost, refs) < task_ratio("margin", spread, refs) < 1.0
    # raising a token that is already the argmax by far moves it not at all
    surer = [PromptResult(margins=[30.0, 2.0]), refs[1], refs[2]]
    assert task_ratio("margin", surer, refs) == 1.0
    # no prompt whose full-cache answer is the argmax: the task does not count
    assert task_ratio("margin", results[:2], [refs[1], refs[1]]) is None
    assert not PromptResult().argmax_answer  # no margins (another objective) never counts
    # what the reference cache stores and reads back
    assert PromptResult.from_dict(refs[0].to_dict()) == refs[0]


def test_the_answer_follows_the_prompt_as_greedy_decoding_writes_it():
    assert answer_continuation("What is the pass key? The pass key is", "97423", chat=False) == " 97423"
    assert answer_continuation("Question: who?\nAnswer:", "Ann", chat=False) == " Ann"
    assert answer_continuation("Answer:\n", "Ann", chat=False) == "Ann"        # after whitespace: as is
    assert answer_continuation("The key is", " 97423", chat=False) == " 97423"  # already delimited
    assert answer_continuation("The key is", "97423", chat=True) == "97423"     # after the assistant turn


def test_generation_where_the_full_cache_scores_zero_everywhere_is_finite():
    ps = prompts({"passkey": 2, "niah": 2})
    zeros = [PromptResult(score=0.0, kept=1.0)] * 4
    lucky = [PromptResult(score=1.0, kept=0.4), PromptResult(score=0.0, kept=0.2)] * 2
    for config in (FitnessConfig(), FitnessConfig(kept_penalty=0.5), FitnessConfig(kept_cap=0.25)):
        a = member_fitness(config, ps, lucky, zeros)
        b = member_fitness(config, ps, [PromptResult(score=0.0, kept=0.3)] * 4, zeros)
        assert a.per_task == {} and a.raw == b.raw == NO_EVIDENCE
        assert math.isfinite(a.fitness) and math.isfinite(b.fitness)
    # with a penalty the member keeping less ranks first; over the cap ranks by how far over
    assert member_fitness(FitnessConfig(kept_penalty=0.5), ps, lucky, zeros).fitness == pytest.approx(1 - 0.5 * 0.3)
    assert member_fitness(FitnessConfig(kept_cap=0.25), ps, lucky, zeros).fitness == pytest.approx(-0.05)
    # a task without evidence drops out; one that has it (here a likelihood task) decides alone
    mixed = ps + prompts({"continuation": 1}, objective="loglik")
    refs = zeros + [PromptResult(loglik=-8.0, tokens=4)]
    member = lucky + [PromptResult(loglik=-12.0, tokens=4)]
    fit = member_fitness(FitnessConfig(), mixed, member, refs)
    assert fit.per_task == pytest.approx({"continuation": math.exp(-1.0)})
    assert fit.raw == pytest.approx(math.exp(-1.0))


def test_task_weights():
    ps = prompts({"a": 1}) + prompts({"continuation": 1}, objective="loglik")
    refs = [PromptResult(score=1.0), PromptResult(loglik=-4.0, tokens=2)]
    member = [PromptResult(score=0.0), PromptResult(loglik=-4.0, tokens=2)]  # ratios 0 and 1
    assert member_fitness(FitnessConfig(), ps, member, refs).raw == pytest.approx(0.5)
    weighted = member_fitness(FitnessConfig(), ps, member, refs, weights={"a": 1.0, "continuation": 0.25})
    assert weighted.raw == pytest.approx(0.25 / 1.25)


def test_mean_over_tasks_and_cache_terms():
    ps = prompts({"a": 2, "b": 1})
    refs = [PromptResult(score=1.0)] * 3
    member = [PromptResult(score=1.0, kept=0.5), PromptResult(score=0.0, kept=0.3), PromptResult(score=1.0, kept=0.1)]
    fit = member_fitness(FitnessConfig(), ps, member, refs)
    assert fit.per_task == pytest.approx({"a": 0.5, "b": 1.0}, rel=1e-6)
    assert fit.raw == pytest.approx(0.75, rel=1e-6) and fit.fitness == fit.raw
    assert fit.kept == pytest.approx(0.3)
    penalised = member_fitness(FitnessConfig(kept_penalty=0.5), ps, member, refs)
    assert penalised.fitness == pytest.approx(0.75 - 0.15, rel=1e-6)
    # over the cap: below every member within it, ordered by how far over
    capped = member_fitness(FitnessConfig(kept_cap=0.2), ps, member, refs)
    assert capped.fitness == pytest.approx(-0.1)
    within = member_fitness(FitnessConfig(kept_cap=0.2), ps, [PromptResult(score=0.0, kept=0.1)] * 3, refs)
    assert within.fitness == 0.0 and within.fitness > capped.fitness


def fake_pools(samples_per_task=3, seed=0) -> PromptPools:
    config = SimpleNamespace(seed=seed, samples=lambda task: samples_per_task,
                             calibration=SimpleNamespace(task="a", samples=2))
    held_out = {t: [Prompt(id=f"{t}:eval{i}", task=t, sample=None) for i in range(2)] for t in "ab"}
    return PromptPools(config, {"a": prompts({"a": 10}), "b": prompts({"b": 10})}, held_out)


def test_generation_draws_are_seeded_fresh_and_without_replacement():
    pools = fake_pools()
    g0 = pools.generation_batch(0, ["a", "b"])
    assert [p.task for p in g0] == ["a"] * 3 + ["b"] * 3
    assert len({p.id for p in g0}) == 6
    assert [p.id for p in g0] == [p.id for p in fake_pools().generation_batch(0, ["a", "b"])]
    later = [[p.id for p in pools.generation_batch(g, ["a"])] for g in range(1, 6)]
    assert any(ids != [p.id for p in g0[:3]] for ids in later)  # fresh prompts each generation
    assert [p.id for p in fake_pools(seed=1).generation_batch(0, ["a"])] != [p.id for p in g0[:3]]
    assert [p.id for p in pools.eval_batch(["a", "b"])] == ["a:eval0", "a:eval1", "b:eval0", "b:eval1"]
    assert [p.id for p in pools.calibration_batch()] == ["a:0", "a:1"]


def test_reference_scores_are_cached_on_disk(tmp_path):
    path = tmp_path / "reference_scores.json"
    ps = prompts({"a": 3})
    refs = ReferenceScores(path, "tiny-llama")
    assert refs.missing(ps + ps) == ps
    refs.add(ps[:2], [PromptResult(score=1.0).to_dict(), PromptResult(score=0.0).to_dict()])
    again = ReferenceScores(path, "tiny-llama")
    assert again.missing(ps) == ps[2:]
    assert [PromptResult.from_dict(r).score for r in again.get(ps[:2])] == [1.0, 0.0]
    assert ReferenceScores(path, "other-model").missing(ps) == ps  # keyed by model too


def test_split_jobs_give_each_worker_its_own_prompts_and_merge_back_in_order():
    """With W workers a member's prompts are cut into W contiguous groups, group k's jobs prefer
    worker k (so each worker reads only its own prompts' shared prefixes), and the results merge
    back per member in prompt order."""
    from collections import deque

    from namm.evolution.backends import _take
    from namm.evolution.fitness import PromptResult, merge_results, split_jobs

    prompts = [f"p{j}" for j in range(5)]
    members = [np.full(3, float(i)) for i in range(4)]
    jobs = split_jobs(members, prompts, workers=2)
    assert [(j.key, j.prompts, j.affinity) for j in jobs[:2]] == [(0, ["p0", "p1"], 0), (0, ["p2", "p3", "p4"], 1)]
    assert len(jobs) == 8 and all(j.params[0] == j.key for j in jobs)
    for k in (0, 1):  # every member has exactly one job per group
        assert sorted(j.key for j in jobs if j.affinity == k) == [0, 1, 2, 3]
    results = [[PromptResult(score=float(p[1:]) + 10 * j.key) for p in j.prompts] for j in jobs]
    merged = merge_results(list(reversed(jobs)), list(reversed(results)), 4)  # in any order of completion
    assert [[r.score for r in m] for m in merged] == [[10 * i + j for j in range(5)] for i in range(4)]
    assert [j.affinity for j in split_jobs(members, prompts, workers=1)] == [None] * 4
    assert len(split_jobs(members, prompts[:1], workers=3)) == 4  # never more groups than prompts
    # a worker takes the first pending job with its affinity, else the first pending one
    pending = deque(range(len(jobs)))
    assert _take(pending, jobs, 1) == 1 and _take(pending, jobs, 1) == 3 and _take(pending, jobs, 0) == 0
    assert _take(pending, jobs, None) == 2
    for _ in range(2):
        _take(pending, jobs, 1)
    assert [jobs[i].affinity for i in pending] == [0, 0] and _take(pending, jobs, 1) == 4  # helps with group 0
