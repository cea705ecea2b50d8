"""Expected Attention: the attention that future queries are expected to give each cached token."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from namm.policies.base import CacheSpec
from namm.policies.ranked import RankedPolicy, protect


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def unrotate(queries: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Queries before RoPE from queries after it, (..., n, d) with cos, sin (n, r), r <= d.

    RoPE maps q to q * cos + rotate_half(q) * sin on the first r dims; its inverse is
    q * cos - rotate_half(q) * sin, divided by cos^2 + sin^2 (1, or the square of the attention
    scaling of scaled-RoPE variants).
    """
    r = cos.shape[-1]
    rot = queries[..., :r]
    back = (rot * cos - rotate_half(rot) * sin) / (cos * cos + sin * sin)
    return torch.cat([back, queries[..., r:]], dim=-1)


def mean_rotation(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(head_dim, head_dim) average of the RoPE matrices R_t = diag(cos_t) + diag(sin_t) P over the
    rows of cos, sin (n, r); P is rotate_half as a matrix, dims beyond r pass through."""
    r, half = cos.shape[-1], cos.shape[-1] // 2
    eye = torch.eye(half, dtype=cos.dtype, device=cos.device)
    rotate = torch.zeros(r, r, dtype=cos.dtype, device=cos.device)
    rotate[half:, :half], rotate[:half, half:] = eye, -eye
    mean = torch.eye(head_dim, dtype=cos.dtype, device=cos.device)
    mean[:r, :r] = torch.diag(cos.mean(0)) + sin.mean(0)[:, None] * rotate  # R is linear in cos, sin
    return mean


@dataclass
class ExpectedAttention(RankedPolicy):
    """Score each cached token by the attention that future queries are expected to give it: fit a
    Gaussian to the recent queries (before RoPE), move it by the RoPE matrix averaged over the next
    ``n_future_positions`` positions, and take the Gaussian moment-generating function
    exp(mu^T k / sqrt(d) + k^T Sigma k / (2d)), normalised over the cache per query head, averaged
    over the query heads of a KV group and multiplied by the value norm. Devoto, Jeblick, Jegou,
    "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries
    Distribution", arXiv 2510.00636.

    Defaults follow NVIDIA kvpress's ``ExpectedAttentionPress``: n_future_positions 512, n_sink 4
    (kept always, left out of the statistics and the normalisation), use_covariance, use_vnorm,
    epsilon 0 (score = (expected attention + epsilon) * ||v||), 1/sqrt(head_dim) as the scale,
    and the average rotation rather than a mixture over positions.

    The statistics are those of the queries read since the previous eviction step. The engine
    hands over queries after RoPE; they are rotated back with the model's RoPE (``CacheSpec.rope``)
    at their positions, so with ``EngineConfig(evict_during_prefill=False)`` the one eviction at the
    end of the prompt uses every prompt query but the sinks, as kvpress's prefill press does; under
    the ``delay`` grid each step uses the ``delay`` queries since the last one (kvpress's decoding
    press uses a buffer of the last 256). The future positions start at the tokens seen so far.
    No extra forward: per step O(cache_len * head_dim^2) per query head for the covariance term
    (1.2x a full-cache prefill on the tiny test Llama).
    """

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    needs_queries = True
    needs_values = True
    name = "expected-attention"

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("n_future_positions", "n_sink"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < (1 if field == "n_future_positions" else 0):
                raise ValueError(f"{field} must be a {'positive' if field == 'n_future_positions' else 'non-negative'} "
                                 f"number of tokens, got {value!r}.")
        if not float(self.epsilon) >= 0.0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon!r}.")

    def reset(self, spec: CacheSpec) -> None:
        if spec.rope is None:
            raise ValueError("ExpectedAttention rotates queries with the model's RoPE, and this model's "
                             "rotary embedding was not found (CacheSpec.rope is None).")
        super().reset(spec)
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> latest keys, values
        self._moments: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}  # layer -> n, sum q, sum q q^T

    def update(self, layer: int, attn: torch.Tensor | None, keys: torch.Tensor, positions: torch.Tensor,
               queries: torch.Tensor | None = None, values: torch.Tensor | None = None) -> None:
        self._kv[layer] = (keys, values)  # the cache's own tensors, dropped at the eviction step
        new_positions = positions[0, -queries.shape[2]:]
        fresh = new_positions >= self.n_sink
        if not bool(fresh.any()):
            return
        cos, sin = self.spec.rope(new_positions[fresh])
        pre = unrotate(queries[:, :, fresh].double(), cos.double(), sin.double())  # (kv_heads, groups, n, d)
        count, total, outer = self._moments.get(layer, (0, 0.0, 0.0))
        self._moments[layer] = (count + pre.shape[2], total + pre.sum(2), outer + pre.transpose(-1, -2) @ pre)

    def query_statistics(self, layer: int, seen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (kv_heads, groups, d) and covariance (kv_heads, groups, d, d) of the queries since the
        last eviction step, moved by the RoPE matrix averaged over positions seen .. seen + n_future - 1."""
        keys = self._kv[layer][0]
        kv_heads, dim = keys.shape[0], keys.shape[-1]
        count, total, outer = self._moments.get(layer, (0, None, None))
        if count == 0:  # no query yet (only sinks read): expected attention is uniform
            groups = 1
            mu = torch.zeros(kv_heads, groups, dim, dtype=torch.float64, device=keys.device)
            cov = torch.zeros(kv_heads, groups, dim, dim, dtype=torch.float64, device=keys.device)
        else:
            mu = total / count
            cov = outer / count - mu[..., :, None] * mu[..., None, :]
        future = torch.arange(seen, seen + self.n_future_positions, device=keys.device)
        rotation = mean_rotation(*(x.double() for x in self.spec.rope(future)), dim)
        return mu @ rotation.T, rotation @ cov @ rotation.T

    def scores(self, layer: int, n_keep: int) -> torch.Tensor:
        positions = self._positions[layer]
        keys, values = (x.float() for x in self._kv[layer])
        mu, cov = (x.float() for x in self.query_statistics(layer, self.tokens_seen(positions)))
        dim = keys.shape[-1]
        logits = torch.einsum("hgd,hkd->hgk", mu, keys) / math.sqrt(dim)  # (kv_heads, groups, cache_len)
        if self.use_covariance:
            logits += torch.einsum("hkd,hgde,hke->hgk", keys, cov, keys) / (2 * dim)
        sink = positions < self.n_sink
        expected = logits.masked_fill(sink[:, None], float("-inf")).softmax(-1).nan_to_num(0.0).mean(1)
        if self.use_vnorm:
            expected = (expected + self.epsilon) * values.norm(dim=-1)
        return protect(expected, positions, n_sink=self.n_sink)

    def prune(self, layer: int, keep: torch.Tensor) -> None:
        self._kv.pop(layer, None)
        self._moments.pop(layer, None)  # the next step fits the queries read from now on
