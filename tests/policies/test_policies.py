"""Every budget policy through the same checks (kvpress style).

A small fake engine feeds each policy the calls the real engine makes (chunked prefill, then one
token per decoding step, eviction every ``delay`` tokens and at the end of the prompt) with random
keys, queries, values and causal attention, runs the side pass of policies that ask for one with
random repeat queries and keys, and records the whole history by absolute position. Each policy's
choice is then compared with its rule computed directly from that history. Ada-KV policies keep
ragged heads: the fake engine pads them as the real one does (position -1, zero attention, a copy of
some token's key), and their rule is computed on each head's own tokens, as if its cache had been
pruned on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from namm.models import byte_tokenizer
from namm.policies import POLICIES, BudgetMixin, CacheSpec, SidePass, make_policy, topk_indices
from namm.policies.base import gather_kept
from namm.policies.pyramidkv import pyramid_budgets


def standard_rope(positions: torch.Tensor, dim: int = 8, theta: float = 10000.0):
    """cos, sin (n, dim) of Llama's RoPE at ``positions`` (n,)."""
    freqs = positions.double()[:, None] / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


SPEC = CacheSpec(num_layers=3, managed_layers=(0, 1, 2), kv_heads=2, head_dim=8, rope=standard_rope)
GROUPS = 2  # query heads per KV head
PROMPT, DECODE, CHUNK, DELAY = 150, 45, 32, 64
TOKENIZER = byte_tokenizer()


@dataclass
class Step:
    """One eviction: the cache before it and the policy's choice, for one layer."""

    layer: int
    seen: int
    positions: torch.Tensor  # (kv_heads, cache_len) absolute positions before eviction, -1: padding
    keep: torch.Tensor  # (kv_heads, n_keep) indices returned by select, -1: padding
    kept: torch.Tensor = field(init=False)  # (kv_heads, n_keep) absolute positions kept, -1: padding

    def __post_init__(self) -> None:
        self.kept = gather_kept(self.positions, self.keep, -1)


@dataclass
class History:
    attn: torch.Tensor  # (layers, kv_heads, tokens, tokens) every attention row fed, by position
    keys: torch.Tensor  # (layers, kv_heads, tokens, head_dim) key of every token
    queries: torch.Tensor  # (layers, kv_heads, groups, tokens, head_dim) query of every token, before RoPE
    values: torch.Tensor  # (layers, kv_heads, tokens, head_dim) value of every token
    steps: list[Step]
    # tokens seen -> one (repeat ids, [(queries, keys) per layer]) per side-pass run of that step
    side: dict[int, list[tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]]] = field(default_factory=dict)

    @property
    def norms(self) -> torch.Tensor:  # (layers, kv_heads, tokens)
        return self.keys.norm(dim=-1)


def call_sizes() -> list[int]:
    """Tokens per forward call: prefill chunks split at multiples of CHUNK and DELAY, then 1s."""
    cuts = sorted({*range(0, PROMPT, CHUNK), *range(0, PROMPT, DELAY), PROMPT})
    return [b - a for a, b in zip(cuts, cuts[1:])] + [1] * DECODE


def gather_tokens(per_token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(kv_heads, tokens, d) -> (kv_heads, cache_len, d) at the cached positions (kv_heads, cache_len)."""
    return per_token.gather(1, pos[..., None].expand(-1, -1, per_token.shape[-1]))


def fake_side_pass(policy, history: History, positions: list[torch.Tensor], ids_all: torch.Tensor, seen: int,
                   gen: torch.Generator) -> None:
    """What the engine's side pass hands the policy: held tokens and a runner with random repeat
    queries and keys appended after each layer's cached keys (recorded in ``history.side``)."""
    held = torch.unique(torch.cat([p.reshape(-1) for p in positions]))
    held = held[held >= 0]

    def run(ids: torch.Tensor, observe) -> None:
        m, per_layer = ids.numel(), []
        for layer, pos in enumerate(positions):
            queries = torch.randn(SPEC.kv_heads, GROUPS, m, SPEC.head_dim, generator=gen) * 2
            repeat = torch.randn(SPEC.kv_heads, m, SPEC.head_dim, generator=gen)
            keys = torch.cat([gather_tokens(history.keys[layer], pos.clamp_min(0)), repeat], dim=1)
            observe(layer, queries, keys)
            per_layer.append((queries, keys))
        history.side.setdefault(seen, []).append((ids.clone(), per_layer))

    policy.side_pass(SidePass(ids_all[held], held, seen == PROMPT, TOKENIZER, run))


def drive(policy, seed: int = 0) -> History:
    gen = torch.Generator().manual_seed(seed)
    total, heads, dim = PROMPT + DECODE, SPEC.kv_heads, SPEC.head_dim
    layers = len(SPEC.managed_layers)
    scale = torch.rand(layers, heads, total, 1, generator=gen)  # spread the key norms
    keys_all = torch.randn(layers, heads, total, dim, generator=gen) * scale
    queries_all = torch.randn(layers, heads, GROUPS, total, dim, generator=gen) + torch.randn(layers, heads, GROUPS, 1, dim, generator=gen)
    values_all = torch.randn(layers, heads, total, dim, generator=gen) * torch.rand(layers, heads, total, 1, generator=gen)
    ids_all = torch.randint(0, 256, (total,), generator=gen)
    history = History(torch.zeros(layers, heads, total, total), keys_all, queries_all, values_all, [])
    positions = [torch.empty(heads, 0, dtype=torch.long) for _ in range(layers)]
    policy.reset(SPEC)
    seen = 0
    for n in call_sizes():
        new = torch.arange(seen, seen + n).expand(heads, -1)
        for layer in range(layers):
            pos = positions[layer] = torch.cat([positions[layer], new], dim=-1)
            keys = gather_tokens(keys_all[layer], pos.clamp_min(0))  # padding: a copy of some key
            logits = torch.randn(heads, n, pos.shape[-1], generator=gen) * 3
            causal = (pos[:, None, :] <= new[:, :, None]) & (pos[:, None, :] >= 0)  # padding hidden
            attn = logits.masked_fill(~causal, -math.inf).softmax(-1)
            for h in range(heads):
                real = pos[h] >= 0
                history.attn[layer, h, seen : seen + n, pos[h][real]] = attn[h][:, real]
            extras = {}
            if policy.needs_queries:  # after RoPE, as the engine hands them over
                extras["queries"] = rotate(queries_all[layer, :, :, seen : seen + n], *standard_rope(new[0]))
            if policy.needs_values:
                extras["values"] = gather_tokens(values_all[layer], pos.clamp_min(0))
            policy.observe(layer, attn if policy.needs_attention else None, keys, pos, **extras)
        seen += n
        if seen % DELAY == 0 or seen == PROMPT:
            if policy.needs_side_pass:
                fake_side_pass(policy, history, positions, ids_all, seen, gen)
            for layer in range(layers):
                keep = policy.select(layer)
                history.steps.append(Step(layer, seen, positions[layer], keep))
                positions[layer] = gather_kept(positions[layer], keep, -1)
    return history


# ---- each rule computed directly from the history: expected kept positions (kv_heads, n) ----


def keep_top(positions: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    return positions.gather(-1, topk_indices(scores, n))


def newest(positions: torch.Tensor, n: int) -> set[int]:
    return set(positions[0, positions.shape[-1] - n :].tolist()) if n > 0 else set()


def rule_streaming(h: History, s: Step, n: int, n_sink: int = 4) -> torch.Tensor:
    sinks = [p for p in s.positions[0].tolist() if p < n_sink][:n]
    kept = sorted(set(sinks) | newest(s.positions, n - len(sinks)))
    return torch.tensor(kept).expand(SPEC.kv_heads, -1)


def score_h2o(h: History, s: Step, n: int) -> torch.Tensor:
    received = h.attn[s.layer, :, : s.seen].sum(dim=1).gather(-1, s.positions)  # every query so far
    n_recent = n // 2
    received[:, s.positions.shape[-1] - n_recent :] = math.inf
    return received


def rule_h2o(h: History, s: Step, n: int) -> torch.Tensor:
    return keep_top(s.positions, score_h2o(h, s, n), n)


def rule_l2(h: History, s: Step, n: int) -> torch.Tensor:
    return keep_top(s.positions, -h.norms[s.layer].gather(-1, s.positions), n)


def rule_tova(h: History, s: Step, n: int) -> torch.Tensor:
    latest = h.attn[s.layer, :, s.seen - 1].mean(0)[s.positions[0]]
    return keep_top(s.positions, latest.expand(SPEC.kv_heads, -1), n)


def score_snapkv(h: History, s: Step, n: int, window: int = 8, pooling: str = "max") -> torch.Tensor:
    votes = h.attn[s.layer, :, max(0, s.seen - window) : s.seen].sum(1).gather(-1, s.positions)
    w = min(window, n)
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    prefix = pool(votes[:, None, :-w], 5, stride=1, padding=2)[:, 0]
    return torch.cat([prefix, torch.full((SPEC.kv_heads, w), math.inf)], -1)


def rule_snapkv(h: History, s: Step, n: int) -> torch.Tensor:
    return keep_top(s.positions, score_snapkv(h, s, n), n)


def rule_expected_attention(h: History, s: Step, n: int) -> torch.Tensor:
    return keep_top(s.positions, score_expected_attention(h, s, n), n)


def score_expected_attention(h: History, s: Step, n: int, n_sink: int = 4, n_future: int = 512) -> torch.Tensor:
    """kvpress's ExpectedAttentionPress on the queries read since the previous eviction step."""
    previous = max([t.seen for t in h.steps if t.layer == s.layer and t.seen < s.seen], default=0)
    queries = h.queries[s.layer, :, :, max(previous, n_sink) : s.seen].double()  # (kv_heads, groups, N, d)
    mu = queries.mean(2)
    centered = queries - mu[:, :, None]
    cov = centered.transpose(-1, -2) @ centered / queries.shape[2]
    cos, sin = (x.double() for x in standard_rope(torch.arange(s.seen, s.seen + n_future)))
    d = SPEC.head_dim
    swap = torch.zeros(d, d, dtype=torch.float64)  # rotate_half as a matrix
    swap[d // 2 :, : d // 2], swap[: d // 2, d // 2 :] = torch.eye(d // 2), -torch.eye(d // 2)
    rotation = torch.stack([torch.diag(c) + torch.diag(si) @ swap for c, si in zip(cos, sin)]).mean(0)
    mu, cov = mu @ rotation.T, rotation @ cov @ rotation.T
    keys = gather_tokens(h.keys[s.layer], s.positions).double()  # (kv_heads, cache_len, d)
    logits = torch.einsum("hgd,hkd->hgk", mu, keys) / math.sqrt(d)
    logits += torch.einsum("hkd,hgde,hke->hgk", keys, cov, keys) / (2 * d)
    sink = s.positions < n_sink
    expected = logits.masked_fill(sink[:, None], -math.inf).softmax(-1).mean(1)
    scores = expected * gather_tokens(h.values[s.layer], s.positions).double().norm(dim=-1)
    scores[sink] = math.inf
    return scores


def kvzip_scores(h: History, s: Step, chunk_size: int = 24, n_sink: int = 4) -> torch.Tensor:
    """(kv_heads, cache_len): the max attention of each chunk's repeat queries over the group's heads,
    softmax over the sinks, the chunk's cached keys and the repeat keys (causal); sinks +inf."""
    held = torch.unique(torch.cat([t.positions.reshape(-1) for t in h.steps if t.seen == s.seen]))
    runs = h.side[s.seen]
    assert len(runs) == len(held.split(chunk_size))
    scores = torch.full(s.positions.shape, math.nan, dtype=torch.float64)
    for chunk, (ids, per_layer) in zip(held.split(chunk_size), runs):
        queries, keys = (x.double() for x in per_layer[s.layer])
        m, cache_len = queries.shape[2], s.positions.shape[-1]
        in_chunk = (s.positions >= chunk[0]) & (s.positions <= chunk[-1])
        hidden = torch.zeros(SPEC.kv_heads, m, cache_len + m, dtype=torch.bool)
        hidden[:, :, :cache_len] = ~(in_chunk | (s.positions < n_sink))[:, None, :]
        hidden[:, :, cache_len:] = torch.ones(m, m, dtype=torch.bool).triu(1)
        logits = torch.einsum("hgqd,hkd->hgqk", queries, keys) / math.sqrt(SPEC.head_dim)
        probs = logits.masked_fill(hidden[:, None], -math.inf).softmax(-1)
        best = probs[..., :cache_len].amax(dim=(1, 2))
        scores[in_chunk] = best[in_chunk]
    assert not scores.isnan().any()
    scores[s.positions < n_sink] = math.inf
    return scores


def rule_kvzip(h: History, s: Step, n: int) -> torch.Tensor:
    return keep_top(s.positions, kvzip_scores(h, s), n)


def sinks(s: Step, n: int, n_sink: int = 4) -> set[int]:
    return {p for p in s.positions[0].tolist() if 0 <= p < n_sink}


def head_scores(score, h: History, s: Step, n: int) -> list[tuple[list[int], list[float]]]:
    """Per head, its held positions and their ``score`` as if the head's cache held only them."""
    out = []
    for head in range(SPEC.kv_heads):
        positions = s.positions[head][s.positions[head] >= 0]
        alone = Step(s.layer, s.seen, positions.expand(SPEC.kv_heads, -1).contiguous(),
                     torch.zeros(SPEC.kv_heads, 1, dtype=torch.long))
        out.append((positions.tolist(), score(h, alone, n)[head].tolist()))
    return out


def rule_ada(score, floor: float = 0.2):
    """Ada-KV over ``score`` (:func:`head_scores`): the forced (+inf) tokens, each head's top
    int(floor * (n - its forced)) others, and the best of the rest over all heads: min(kv_heads * n,
    tokens held) in all, ties to the lower head, then the older token. Returns each head's kept
    positions."""
    def rule(h: History, s: Step, n: int) -> list[list[int]]:
        heads, own, entries = SPEC.kv_heads, [], []
        for head, (positions, scores) in enumerate(head_scores(score, h, s, n)):
            own.append(positions)
            forced = [i for i, v in enumerate(scores) if v == math.inf]
            others = sorted((i for i, v in enumerate(scores) if v != math.inf), key=lambda i: (-scores[i], i))
            safeguard = set(others[: int(floor * max(n - len(forced), 0))])
            entries += [(0 if v == math.inf else 1 if i in safeguard else 2, -v, head, i) for i, v in enumerate(scores)]
        chosen = sorted(entries)[: min(heads * n, len(entries))]
        return [sorted(own[head][i] for _, _, of, i in chosen if of == head) for head in range(heads)]
    rule.score = score
    return rule


def budget_of(kwargs: dict, seen: int) -> int:
    return kwargs["budget"] if "budget" in kwargs else math.ceil(kwargs["keep_ratio"] * seen)


def layer_budget(name: str, kwargs: dict, s: Step) -> int:
    uniform = min(s.seen, budget_of(kwargs, s.seen))
    if name in ("pyramidkv", "ada-pyramidkv"):
        uniform = pyramid_budgets(uniform, 8, 3, 20.0, s.seen)[s.layer]
    return min(s.positions.shape[-1], uniform)


# name -> (policy kwargs beyond the budget, rule or None, tokens that must stay)
CASES = {
    "streaming": ({}, rule_streaming, lambda s, n: {p for p in s.positions[0].tolist() if p < 4}),
    "recency": ({}, lambda h, s, n: rule_streaming(h, s, n, n_sink=0), lambda s, n: newest(s.positions, n)),
    "random": ({"seed": 3}, None, lambda s, n: {s.seen - 1}),
    "h2o": ({}, rule_h2o, lambda s, n: newest(s.positions, n // 2)),
    "l2": ({}, rule_l2, lambda s, n: set()),
    "snapkv": ({"window": 8}, rule_snapkv, lambda s, n: newest(s.positions, min(8, n))),
    "tova": ({}, rule_tova, lambda s, n: set()),
    "pyramidkv": ({"window": 8}, rule_snapkv, lambda s, n: newest(s.positions, min(8, n))),
    "expected-attention": ({}, rule_expected_attention, sinks),
    "kvzip": ({"chunk_size": 24}, rule_kvzip, sinks),
    "kvzip-once": ({"chunk_size": 24}, None, sinks),  # its rule: test_kvzip_once_at_prompt_end
    # window 24 > the 22 tokens between the steps at 128 and 150: votes cast before a ragged step
    # are still pooled at the next one, next to the padding
    "ada-snapkv": ({"window": 24, "pooling": "avg"}, rule_ada(partial(score_snapkv, window=24, pooling="avg")),
                   lambda s, n: newest(s.positions, min(24, n))),
    "ada-pyramidkv": ({"window": 8}, rule_ada(score_snapkv), lambda s, n: newest(s.positions, min(8, n))),
    "ada-h2o": ({}, rule_ada(score_h2o), lambda s, n: newest(s.positions, n // 2)),
    "ada-expected-attention": ({}, rule_ada(score_expected_attention), sinks),
}


@pytest.mark.parametrize("budget", [{"budget": 40}, {"keep_ratio": 0.3}], ids=["budget", "keep_ratio"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_policy(name: str, budget: dict) -> None:
    extra, rule, forced = CASES[name]
    policy, recorded = make_policy(name, **budget, **extra), []
    policy.score_hook = lambda layer, positions, scores: recorded.append(scores.clone())
    history = drive(policy)
    assert [s.seen for s in history.steps[::3]] == [64, 128, PROMPT, 192]
    ada, ragged = name.startswith("ada-"), False  # Ada-KV: ragged heads, the layer's budget shared
    for step, s in enumerate(history.steps):
        n = layer_budget(name, budget, s)
        assert s.keep.dtype == torch.long
        kept = [row[row >= 0].tolist() for row in s.kept]
        for row, own in zip(s.keep, kept):  # padding (-1) first, then strictly ascending
            assert (row[: row.numel() - len(own)] == -1).all() and bool((row[row >= 0].diff() > 0).all())
        if ada:
            held = (s.positions >= 0).sum(-1).tolist()
            assert sum(map(len, kept)) == min(SPEC.kv_heads * n, sum(held)), (s.layer, s.seen)
            for own, n_held in zip(kept, held):  # the safeguard: a floor share of the equal split each
                n_forced = len(forced(s, n))
                assert len(own) >= min(n_held, n_forced + int(0.2 * (n - n_forced))), (s.layer, s.seen)
            ragged |= bool((s.keep < 0).any())
            for head, (_, alone) in enumerate(head_scores(rule.score, history, s, n)):  # padding changes no score
                got = recorded[step][head][s.positions[head] >= 0].double()
                torch.testing.assert_close(got, torch.tensor(alone, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        else:
            assert s.keep.shape == (SPEC.kv_heads, n), (s.layer, s.seen)
        for head in kept:
            assert forced(s, n) <= set(head), f"{name} dropped a sink/recent token at {s.seen}"
        if rule is not None:
            expected = rule(history, s, n)
            expected = expected if isinstance(expected, list) else expected.tolist()
            assert kept == expected, f"{name} layer {s.layer} seen {s.seen}"
    assert ragged == ada, "Ada-KV never split a budget unevenly" if ada else "a uniform policy kept ragged heads"
    per_step = {}
    for s in history.steps:
        per_step[s.seen] = per_step.get(s.seen, 0) + int((s.keep >= 0).sum()) / SPEC.kv_heads
    for seen, total in per_step.items():  # pyramid redistributes, the total stays uniform
        assert total == 3 * min(seen, budget_of(budget, seen))
    again = drive(make_policy(name, **budget, **extra))
    assert all(torch.equal(a.keep, b.keep) for a, b in zip(history.steps, again.steps))


def test_registry_names() -> None:
    """Every registered policy answers to its key (any case, "_" for "-"), and every budget policy
    has a rule in CASES, so none skips the checks above."""
    for name, cls in POLICIES.items():
        assert cls.name == name
        if issubclass(cls, BudgetMixin):
            assert name in CASES, f"{name}: add its rule to CASES"
            assert make_policy(name.upper().replace("-", "_"), budget=8).name == name
    assert set(CASES) <= set(POLICIES)


@pytest.mark.parametrize(
    "budget, seen, beta, expected",
    [(40, 64, 20, [64, 40, 16]),  # bottom capped at the 56 tokens seen beyond the window
     (40, 128, 20, [70, 40, 10]),  # 62.4 / 32 / 1.6 beyond the window, rounded to sum 96
     (40, 60, 20, [40, 40, 40]),  # fewer than 2 * (budget - window) seen: uniform
     (40, 128, 1, [40, 40, 40]),  # beta 1: uniform
     (6, 128, 20, [6, 6, 6])],  # budget within the window: uniform
)
def test_pyramid_budgets(budget: int, seen: int, beta: float, expected: list[int]) -> None:
    assert pyramid_budgets(budget, 8, 3, beta, seen) == expected


def test_pyramid_budgets_many_layers() -> None:
    budgets = pyramid_budgets(1024, 32, 30, 20.0, 100_000)
    assert sum(budgets) == 30 * 1024 and budgets == sorted(budgets, reverse=True)
    assert budgets[-1] == 32 + round(992 / 20) and budgets[0] == 32 + round(2 * 992 - 992 / 20)


def test_ada_keep_by_hand() -> None:
    """Head 0 outscores head 1 everywhere; both force their newest token (+inf). Budget 5 per head,
    10 in all: without a safeguard head 1 keeps only its newest; floor 0.5 gives it 2 more (half of
    its 4 unforced share), its best; padding is never kept, and the total stops at what is held."""
    from namm.policies.adakv import AdaKV, ada_keep
    from namm.policies.tova import TOVA

    scores = torch.stack([torch.arange(10.0) + 100, torch.tensor([5.0, 1, 7, 3, 6, 2, 0, 4, 8, 9])])
    scores[:, -1] = math.inf
    held = torch.ones(2, 10, dtype=torch.bool)
    assert ada_keep(scores, held, 5, 0.0).sum(-1).tolist() == [9, 1]
    keep = ada_keep(scores, held, 5, 0.5)
    assert keep[1].nonzero().squeeze(-1).tolist() == [2, 8, 9] and keep[0].sum() == 7
    held[0, :6] = False  # head 0 holds 4 tokens (6 padded slots)
    keep = ada_keep(scores, held, 5, 0.5)
    assert not (keep & ~held).any() and keep[0].sum() == 4 and keep[1].sum() == 6
    held[1, :8] = False  # 6 tokens held in all, fewer than the budget of 10
    assert ada_keep(scores, held, 5, 0.5).sum() == 6
    with pytest.raises(ValueError, match="TOVA"):
        dataclass(type("AdaTOVA", (AdaKV, TOVA), {}))(budget=8)


def test_random_depends_on_seed() -> None:
    a = drive(make_policy("random", budget=40, seed=0)).steps
    b = drive(make_policy("random", budget=40, seed=1)).steps
    assert any(not torch.equal(x.keep, y.keep) for x, y in zip(a, b))


BUDGET_POLICIES = sorted(CASES)


@pytest.mark.parametrize("name", BUDGET_POLICIES)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"budget": 0}, {"budget": -3}, {"budget": 2.5}, {"keep_ratio": 0}, {"keep_ratio": 1.5},
     {"budget": 10, "keep_ratio": 0.5}],
)
def test_bad_budget(name: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match="budget|keep_ratio"):
        make_policy(name, **kwargs)


@pytest.mark.parametrize(
    "name, kwargs",
    [("streaming", {"n_sink": -1}), ("h2o", {"recent_ratio": 1.5}), ("l2", {"n_recent": -1}),
     ("snapkv", {"window": 0}), ("snapkv", {"kernel_size": 4}), ("snapkv", {"pooling": "mean"}),
     ("pyramidkv", {"beta": 0.5}), ("random", {"seed": "x"}),
     ("expected-attention", {"n_future_positions": 0}), ("expected-attention", {"n_sink": -1}),
     ("expected-attention", {"epsilon": -1.0}), ("kvzip", {"chunk_size": 0}), ("kvzip", {"prev_postfix_size": -1}),
     ("kvzip", {"n_sink": 1.5}), ("ada-snapkv", {"floor": 1.5}), ("ada-h2o", {"floor": -0.1})],
)
def test_bad_hyperparameters(name: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        make_policy(name, budget=8, **kwargs)


def test_h2o_accumulates_across_evictions_and_decoding() -> None:
    """Token 1 wins on prefill attention alone, token 6 on decoding attention: both survive."""
    spec = CacheSpec(num_layers=1, managed_layers=(0,), kv_heads=1, head_dim=2)
    policy = make_policy("h2o", budget=4)
    policy.reset(spec)

    def call(positions: list[int], rows: list[list[float]]) -> None:
        pos = torch.tensor([positions])
        policy.observe(0, torch.tensor([rows]), torch.zeros(1, len(positions), 2), pos)

    prefill = []
    for q in range(8):  # token 1 draws most prefill attention, token 5 the next most
        row = [0.0] * 8
        if q <= 1:
            row[q] = 1.0
        elif q <= 5:
            row[1], row[q] = 0.6, 0.4
        else:
            row[1], row[5], row[q] = 0.5, 0.35, 0.15
        prefill.append(row)
    call(list(range(8)), prefill)
    assert policy.select(0).tolist() == [[1, 5, 6, 7]]  # heavy {1, 5} + recent {6, 7}
    cache = [1, 5, 6, 7]
    for token in (8, 9):  # decoding, one query per call: 0.8 on token 6, 0.15 on token 5
        cache.append(token)
        rest = 0.05 / (len(cache) - 2)
        call(cache, [[{6: 0.8, 5: 0.15}.get(p, rest) for p in cache]])
    keep = policy.select(0)[0].tolist()
    # decoding alone would keep {5, 6}; with the prefill carried over, 1 (4.4 + 0.02) stays and
    # 6 (0.15 + 1.6) overtakes 5 (1.1 + 0.3)
    assert [cache[i] for i in keep] == [1, 6, 8, 9]


def test_kvzip_once_at_prompt_end() -> None:
    """every_step=False: one repeat pass, at the prompt's end; before it the prompt is read as
    StreamingLLM would, after it tokens read later rank above the scored ones, newest first."""
    history = drive(make_policy("kvzip-once", keep_ratio=0.3, chunk_size=24))
    again = drive(make_policy("kvzip", keep_ratio=0.3, every_step=False, chunk_size=24))
    assert all(torch.equal(a.keep, b.keep) for a, b in zip(history.steps, again.steps))
    assert list(history.side) == [PROMPT]
    at_end = {s.layer: s for s in history.steps if s.seen == PROMPT}
    for s in history.steps:
        n = layer_budget("kvzip", {"keep_ratio": 0.3}, s)
        if s.seen < PROMPT:
            expected = rule_streaming(history, s, n)
        elif s.seen == PROMPT:
            expected = rule_kvzip(history, s, n)
        else:
            end = at_end[s.layer]
            scored = kvzip_scores(history, end)
            later = 1.0 + torch.arange(s.positions.shape[-1], dtype=torch.float64) / s.positions.shape[-1]
            scores = torch.stack([
                torch.tensor([scored[h][end.positions[h] == p].item() if p < PROMPT else later[i].item()
                              for i, p in enumerate(s.positions[h].tolist())])
                for h in range(SPEC.kv_heads)])
            expected = keep_top(s.positions, scores, n)
        assert torch.equal(s.kept, expected), s.seen


@pytest.fixture(scope="module")
def tiny_llama():
    from namm.models import tiny_model

    return tiny_model("llama", seed=0, dtype=torch.float32)


@pytest.mark.parametrize("budget", [{"budget": 40}, {"keep_ratio": 0.25}], ids=["budget", "keep_ratio"])
@pytest.mark.parametrize("name", BUDGET_POLICIES)
def test_policy_under_engine(tiny_llama, name: str, budget: dict) -> None:
    """300-token prompt, delay 64, chunk 32, then 24 decoded tokens: every eviction keeps the
    budget arithmetic, and the engine's report measures it."""
    from namm.engine import Engine, EngineConfig

    model, tok = tiny_llama
    engine = Engine(model, tok, config=EngineConfig(chunk_size=32, delay=64, record_evictions=True))
    prompt = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0))
    layers = len(SPEC.managed_layers)
    with engine.running():
        seq = engine.start(make_policy(name, **budget))
        logits = seq.feed(prompt, end_of_prompt=True)
        for _ in range(24):
            logits = seq.feed(logits.argmax()[None])
    assert [seen for seen, _ in seq.eviction_log] == [64, 128, 192, 256, 300, 320]
    for seen, kept in seq.eviction_log:
        sizes = [int((kept[layer] >= 0).sum()) / SPEC.kv_heads for layer in range(layers)]  # per head, mean
        assert sum(sizes) == layers * min(seen, budget_of(budget, seen)), (seen, sizes)
        if not name.endswith("pyramidkv"):
            assert set(sizes) == {min(seen, budget_of(budget, seen))}
    report = seq.report()
    assert report.tokens_seen == 324 and report.evictions == 6
    assert sum(report.final_len) == layers * (budget_of(budget, 320) + 4)
    assert report.kept_fraction == pytest.approx(sum(report.final_len) / (layers * 324))
