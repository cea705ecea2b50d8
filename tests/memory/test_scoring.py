"""BAM and MLP scorers: parameter counts, the reference flat layout, the backward mask."""

from __future__ import annotations

import math

import pytest
import torch

from namm.memory.scoring import BAMScorer, MLPScorer, ScorerConfig, build_scorer, score_ragged


def random_bam(seed: int = 0, dtype=torch.float64) -> BAMScorer:
    bam = BAMScorer(dtype=dtype)
    bam.set_flat(torch.randn(bam.num_params, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 0.3)
    return bam


def naive_bam(flat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BAM written from the reference layout with explicit offsets and a materialised mask."""
    d, h = 25, 32
    o = 0
    w1 = flat[o : o + d * 3 * h].reshape(d, 3 * h); o += d * 3 * h
    b1 = flat[o : o + 3 * h]; o += 3 * h
    w2 = flat[o : o + h * 2 * d].reshape(h, 2 * d); o += h * 2 * d
    b2 = flat[o : o + 2 * d]; o += 2 * d
    w3 = flat[o : o + d]; o += d
    b3 = flat[o]; o += 1
    assert o == flat.numel()
    qkv = z @ w1 + b1
    q, k, v = qkv[..., :h], qkv[..., h : 2 * h], qkv[..., 2 * h :]
    n = z.shape[-2]
    logits = q @ k.transpose(-1, -2) / math.sqrt(h)
    older = torch.arange(n)[None, :] < torch.arange(n)[:, None]  # j < i
    logits = logits.masked_fill(older, torch.finfo(z.dtype).min)
    u = torch.softmax(logits, dim=-1) @ v @ w2 + b2
    res, mul = u[..., :d], u[..., d:]
    return (z * (1 + mul) + res) @ w3 + b3


def test_param_counts() -> None:
    assert BAMScorer().num_params == 4172
    assert build_scorer(ScorerConfig(), 25).num_params == 4172
    assert MLPScorer(depth=1).num_params == 26
    assert MLPScorer(depth=2).num_params == 25 * 25 + 25 + 25 + 1
    assert MLPScorer(hidden=16, depth=3).num_params == (25 * 16 + 16) + (16 * 16 + 16) + (16 + 1)


@pytest.mark.parametrize("scorer", [BAMScorer(), MLPScorer(depth=3)])
def test_zero_params_score_zero(scorer) -> None:
    z = torch.randn(4, 50, 25)
    assert torch.equal(scorer(z), torch.zeros(4, 50))


def test_bam_matches_naive_reference_layout() -> None:
    bam = random_bam(1)
    z = torch.randn(3, 40, 25, dtype=torch.float64)
    torch.testing.assert_close(bam(z), naive_bam(bam.get_flat(), z), rtol=1e-10, atol=1e-10)


def test_bam_backward_mask() -> None:
    bam = random_bam(2)
    z = torch.randn(2, 30, 25, dtype=torch.float64)
    base = bam(z)
    i = 12
    perturbed = z.clone()
    perturbed[:, i] += torch.randn(2, 25, dtype=torch.float64)
    out = bam(perturbed)
    torch.testing.assert_close(out[:, i + 1 :], base[:, i + 1 :], rtol=0, atol=1e-12)  # newer tokens: unchanged
    assert (out[:, i] - base[:, i]).abs().min() > 1e-6  # its own score changes
    assert (out[:, :i] - base[:, :i]).abs().max() > 1e-6  # older tokens attend to it


def test_bam_batch_permutation_equivariance() -> None:
    bam = random_bam(3)
    z = torch.randn(6, 25, 25, dtype=torch.float64)  # (layers x heads, tokens, features)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(bam(z[perm]), bam(z)[perm], rtol=0, atol=1e-12)


def test_flat_layout_block_constants() -> None:
    bam = BAMScorer()
    sizes = [2400, 96, 1600, 50, 25, 1]
    vec = torch.cat([torch.full((n,), float(i + 1)) for i, n in enumerate(sizes)])
    bam.set_flat(vec)
    blocks = bam.blocks()
    assert list(blocks) == ["w_qkv", "b_qkv", "w_out", "b_out", "w_head", "b_head"]
    for i, (name, block) in enumerate(blocks.items()):
        assert torch.all(block == i + 1), name
    assert blocks["w_qkv"].shape == (25, 96) and blocks["w_out"].shape == (32, 50)
    assert torch.equal(bam.get_flat(), vec)


def test_flat_blocks_drive_the_right_computation() -> None:
    z = torch.randn(1, 7, 25, dtype=torch.float64)
    bam = BAMScorer(dtype=torch.float64)
    n = bam.num_params
    vec = torch.zeros(n, dtype=torch.float64)
    vec[-1] = 0.7  # b3: every score is the bias
    bam.set_flat(vec)
    torch.testing.assert_close(bam(z), torch.full((1, 7), 0.7, dtype=torch.float64))
    vec = torch.zeros(n, dtype=torch.float64)
    vec[n - 26 + 3] = 1.0  # w3 = e_3: score is feature 3
    res_shift, mul_shift = 0.5, 2.0
    b2 = n - 26 - 50
    vec[b2 + 3] = res_shift  # residual half of b2 (first 25)
    vec[b2 + 25 + 3] = mul_shift  # multiplicative half of b2 (last 25)
    bam.set_flat(vec)
    torch.testing.assert_close(bam(z), z[..., 3] * (1 + mul_shift) + res_shift)


def test_mlp_matches_linear_stack() -> None:
    mlp = MLPScorer(hidden=8, depth=3, residual=True, dtype=torch.float64)
    mlp.set_flat(torch.randn(mlp.num_params, dtype=torch.float64))
    flat, o = mlp.get_flat(), 0
    layers = []
    for d_in, d_out in [(25, 8), (8, 8), (8, 1)]:
        w = flat[o : o + d_in * d_out].reshape(d_in, d_out); o += d_in * d_out
        b = flat[o : o + d_out]; o += d_out
        layers.append((w, b))
    z = torch.randn(2, 5, 25, dtype=torch.float64)
    h = torch.relu(z @ layers[0][0] + layers[0][1])
    h = h + torch.relu(h @ layers[1][0] + layers[1][1])  # relu(linear(h)), not the reference's relu(h)
    expected = (h @ layers[2][0] + layers[2][1]).squeeze(-1)
    torch.testing.assert_close(mlp(z), expected)


def test_set_flat_rejects_wrong_size() -> None:
    with pytest.raises(ValueError, match="4172"):
        BAMScorer().set_flat(torch.zeros(4171))
    with pytest.raises(ValueError, match="Unknown scorer"):
        ScorerConfig(kind="lstm")


@pytest.mark.parametrize("slack", [1.25, float("inf")], ids=["grouped", "one-call"])
@pytest.mark.parametrize("kind", ["bam", "mlp"])
def test_score_ragged_left_padding_equals_separate_calls(kind: str, slack: float) -> None:
    """Token sets of unequal length (layers x heads), left-padded into shared calls: BAM's backward
    mask keeps every real token blind to the older padding, so scores equal one call per set."""
    scorer = random_bam(4) if kind == "bam" else MLPScorer(hidden=8, depth=2, dtype=torch.float64)
    if kind == "mlp":
        scorer.set_flat(torch.randn(scorer.num_params, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    gen = torch.Generator().manual_seed(6)
    sets = [torch.randn(h, n, 25, generator=gen, dtype=torch.float64) for h, n in [(2, 40), (3, 25), (2, 40), (2, 7), (3, 33)]]
    calls = []
    original = scorer.forward
    scorer.forward = lambda z: calls.append(tuple(z.shape)) or original(z)
    got = score_ragged(scorer, sets, slack=slack)
    for z, scores in zip(sets, got):
        torch.testing.assert_close(scores, original(z), rtol=0, atol=1e-12)
    if slack == float("inf"):
        assert calls == [(12, 40, 25)]  # every set in one call, padded to 40 tokens
    else:
        assert calls == [(7, 40, 25), (3, 25, 25), (2, 7, 25)]  # 40, 40 and 33 share a call; 25 and 7 would waste
