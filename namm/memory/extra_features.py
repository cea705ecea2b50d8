"""Optional per-token NAMM inputs beyond the attention spectrogram (``FeatureConfig.extras``).

The paper's NAMM sees, per cached token, an EMA'd STFT of the attention it received plus its age
(:mod:`namm.memory.features`). These extra inputs stay model-agnostic (no hidden sizes, no
vocabulary; norms are relative to the layer's own cache, attention values are probabilities) and
are cheap to stream:

* ``value_norm``   log(|v_k| / mean_j |v_j|), the token's value norm relative to its head's cache.
* ``key_norm``     log(|k_k| / mean_j |k_j|), the same for keys (the L2 baseline keeps *low* ones).
* ``attn_var``     log of the EMA-weighted variance over queries of the attention the token got.
* ``attn_entropy`` entropy of the EMA-weighted attention the token got, as a distribution over
                   the queries that gave it: high when many queries attended it evenly, 0 when a
                   single query did (or none).
* ``attn_peak``    log of the largest attention any recent query gave it, decayed with age.
* ``attn_sum``     log of the attention it received from every query since it entered, without
                   decay: H2O's accumulated-attention score.
* ``attn_last``    log of the attention the newest query gave it: TOVA's score (per KV head here;
                   TOVA averages it over the heads).

With ``attn_sum`` and ``attn_last`` a NAMM can express the H2O and TOVA rules and any blend of
them with the other inputs.

Attention statistics are streamed like the spectrogram: after each forward call the chunk's
attention (kv_heads, new_queries, cache_len) is folded into a few numbers per token and dropped.
Query i of a stream of T gets the weight ``w_i = (1 - g) g**(T - 1 - i)`` (g = ``ema_coeff``,
0.99 per query as the spectrogram), and a token gets zero attention from the queries before it
existed, as in the spectrogram.

A NAMM can use every input but ``value_norm`` (:data:`NAMM_EXTRAS`): memory policies see the
cached keys and the attention, not the values.
"""

from __future__ import annotations

import math

import torch

from namm.memory.buffers import capacity_for, fresh, with_capacity

EXTRA_FEATURES = ("value_norm", "key_norm", "attn_var", "attn_entropy", "attn_peak", "attn_sum", "attn_last")
NAMM_EXTRAS = ("key_norm", "attn_var", "attn_entropy", "attn_peak", "attn_sum", "attn_last")  # what NAMMPolicy streams
LOG_EPS = 1e-10  # floor inside the logs of variance and peak
PENDING_ROWS = 16  # decoding steps whose attention is stored before it is folded (AttentionMoments)


def a_log_a(a: torch.Tensor) -> torch.Tensor:
    """a log a elementwise for a >= 0, with 0 log 0 = 0: ``torch.xlogy(a, a)`` 2.4x faster on a CPU
    (xlogy is not vectorised; a clamped log and a product are). Below the smallest normal number
    the log is taken of that number instead, a change under 1e-36 per weight."""
    return a.clamp_min(torch.finfo(a.dtype).tiny).log_().mul_(a)


def relative_log_norm(x: torch.Tensor) -> torch.Tensor:
    """log(|x_k| / mean_j |x_j|) per head: (kv_heads, cache_len, head_dim) -> (kv_heads, cache_len).

    Scale-free (a layer whose keys are 10x larger gets the same values), so one NAMM can read it
    on every layer and model.
    """
    return relative_log(vector_norms(x))


def vector_norms(x: torch.Tensor) -> torch.Tensor:
    """|x_k| per head and token, (kv_heads, cache_len, head_dim) -> (kv_heads, cache_len), floored."""
    return x.float().norm(dim=-1).clamp_min(1e-12)


def relative_log(norms: torch.Tensor) -> torch.Tensor:
    """log(n_k / mean_j n_j) per head of norms (kv_heads, cache_len)."""
    return (norms / norms.mean(dim=-1, keepdim=True)).log()


class AttentionMoments:
    """Per-layer streaming EMA statistics of the attention each cached token receives.

    State per layer, each (kv_heads, cache_len): ``s`` = sum_i w_i a_i, ``s2`` = sum_i w_i a_i^2,
    ``t`` = sum_i w_i a_i log a_i, ``r`` = sum_i w_i a_i log w_i (keeps the entropy exact as the
    weights decay), ``peak`` = max_i g**(T-1-i) a_i, ``sum`` = sum_i a_i (no decay), ``last`` =
    a_{T-1}; plus ``total`` = sum_i w_i = 1 - g**T, the same for every token. New tokens enter
    with zeros.
    """

    STATS = ("s", "s2", "t", "r", "peak", "sum", "last")

    def __init__(self, ema_coeff: float = 0.99) -> None:
        if not 0.0 < float(ema_coeff) < 1.0:
            raise ValueError(f"ema_coeff must be in (0, 1), got {ema_coeff!r}.")
        self.ema_coeff = float(ema_coeff)
        self._buffers: dict[int, torch.Tensor] = {}  # layer -> (len(STATS), kv_heads, capacity), see namm.memory.buffers
        self._n_tokens: dict[int, int] = {}
        self.total: dict[int, float] = {}
        self._pending: dict[int, torch.Tensor] = {}  # layer -> (kv_heads, PENDING_ROWS, capacity): decoding rows
        self._n_pending: dict[int, int] = {}

    def reset(self) -> None:
        for state in (self._buffers, self._n_tokens, self.total, self._pending, self._n_pending):
            state.clear()

    @property
    def state(self) -> dict[int, dict[str, torch.Tensor]]:
        """Layer -> {"s", "s2", "t", "r", "peak", "sum", "last"} -> (kv_heads, cache_len) (views of the buffers)."""
        return {layer: self._current(layer) for layer in self._buffers}

    def _stats(self, layer: int) -> dict[str, torch.Tensor]:
        stats = self._buffers[layer][:, :, : self._n_tokens[layer]]
        return dict(zip(self.STATS, stats.unbind(0)))

    def _current(self, layer: int) -> dict[str, torch.Tensor]:
        """:meth:`_stats` with every decoding step's attention folded in."""
        self._flush(layer)
        return self._stats(layer)

    def observe(self, layer: int, attn: torch.Tensor) -> None:
        """Fold one forward call's attention (kv_heads, new_queries, cache_len) into the state.

        A decoding step's row (one query) is only stored: up to ``PENDING_ROWS`` of them are folded
        at once, as one chunk (the closed form is exact for any number of rows), when the buffer is
        full or before the statistics are read or pruned. That is 1 tensor call per layer and step
        instead of ~25.
        """
        heads, n_new, cache_len = attn.shape
        if layer not in self._buffers:
            self._buffers[layer] = attn.new_zeros(len(self.STATS), heads, capacity_for(cache_len))
            self._pending[layer] = attn.new_zeros(heads, PENDING_ROWS, capacity_for(cache_len))
            self._n_tokens[layer], self._n_pending[layer] = 0, 0
        old = self._n_tokens[layer]
        if cache_len < old:
            raise RuntimeError(f"layer {layer}: attention covers {cache_len} keys but {old} "
                               "are tracked; prune() the evicted tokens first.")
        # New tokens enter with zeros and got no attention from the stored rows: every slot past
        # the tracked tokens is zero already (buffers are allocated zeroed and every write covers
        # tracked tokens only; see StreamingSpectrogram._grow), so there is nothing to write.
        if cache_len > min(self._buffers[layer].shape[2], self._pending[layer].shape[2]):
            self._buffers[layer] = with_capacity(self._buffers[layer], 2, old, cache_len)
            self._pending[layer] = with_capacity(self._pending[layer], 2, old, cache_len)
        self._n_tokens[layer] = cache_len
        if n_new == 1:
            row = self._n_pending[layer]
            self._pending[layer][:, row, :cache_len] = attn[:, 0]
            self._n_pending[layer] = row + 1
            if row + 1 == PENDING_ROWS:
                self._flush(layer)
            return
        self._flush(layer)
        self._fold(layer, attn)

    def _flush(self, layer: int) -> None:
        """Fold the stored decoding rows of ``layer``, if any."""
        n = self._n_pending.get(layer, 0)
        if n:
            self._n_pending[layer] = 0
            # a read or prune comes from an eviction step, outside the forward's inference mode,
            # where the buffers (made inside it) cannot be updated in place otherwise
            with torch.inference_mode():
                self._fold(layer, self._pending[layer][:, :n, : self._n_tokens[layer]])

    def _fold(self, layer: int, a: torch.Tensor) -> None:
        """Fold attention ``a`` (kv_heads, new_queries, cache_len), the newest query last."""
        n_new, g = a.shape[1], self.ema_coeff
        state = self._stats(layer)  # updated in place below
        age = torch.arange(n_new - 1, -1, -1, dtype=a.dtype, device=a.device)  # newest query: 0
        w = (1.0 - g) * g**age  # (new_queries,)
        decay = g**n_new
        weights = torch.stack([w, w * w.log()])  # (2, new_queries): for s and for r
        s_new, r_new = torch.matmul(weights, a).unbind(1)  # 2 x (kv_heads, cache_len)
        # old weights shrink by g**n_new: log w gains n_new log g (r reads s before s moves on)
        state["r"].add_(n_new * math.log(g) * state["s"]).mul_(decay).add_(r_new)
        state["s"].mul_(decay).add_(s_new)
        state["s2"].mul_(decay).add_(torch.matmul(w, a.square()))
        state["t"].mul_(decay).add_(torch.matmul(w, a_log_a(a)))
        recent_peak = (a * (g**age)[:, None]).amax(dim=1)  # (kv_heads, cache_len)
        torch.maximum(state["peak"].mul_(decay), recent_peak, out=state["peak"])
        state["sum"].add_(a.sum(dim=1))
        state["last"].copy_(a[:, -1])
        self.total[layer] = decay * self.total.get(layer, 0.0) + (1.0 - decay)

    def prune(self, layer: int, keep_idx: torch.Tensor) -> None:
        """Keep only the tokens ``keep_idx`` (kv_heads, n_keep) of ``layer``."""
        self._flush(layer)
        stats = self._buffers[layer][:, :, : self._n_tokens[layer]]
        idx = keep_idx.to(stats.device)
        self._buffers[layer] = fresh(stats.gather(2, idx.expand(len(self.STATS), *idx.shape)), 2)
        self._pending[layer] = stats.new_zeros(stats.shape[1], PENDING_ROWS, capacity_for(idx.shape[-1]))
        self._n_tokens[layer] = idx.shape[-1]

    # -- per-token statistics, each (kv_heads, cache_len) ------------------------------------------
    def mean(self, layer: int) -> torch.Tensor:
        """EMA-weighted mean attention received (the weights normalised to sum to 1)."""
        st = self._current(layer)
        return st["s"] / max(self.total[layer], 1e-30)

    def variance(self, layer: int) -> torch.Tensor:
        """EMA-weighted variance over queries of the attention received."""
        st = self._current(layer)
        total = max(self.total[layer], 1e-30)
        mean = st["s"] / total
        return (st["s2"] / total - mean * mean).clamp_min(0.0)

    def entropy(self, layer: int) -> torch.Tensor:
        """Entropy of p_i = w_i a_i / sum_j w_j a_j over the queries i (0 for unattended tokens)."""
        st = self._current(layer)
        s = st["s"]
        attended = s > 0
        safe = torch.where(attended, s, torch.ones_like(s))
        h = safe.log() - (st["t"] + st["r"]) / safe
        return torch.where(attended, h, torch.zeros_like(h)).clamp_min(0.0)

    def peak(self, layer: int) -> torch.Tensor:
        """max_i g**(T-1-i) a_i: the strongest recent attention, decayed with its age."""
        return self._current(layer)["peak"]

    def accumulated(self, layer: int) -> torch.Tensor:
        """sum_i a_i over every query since the token entered (H2O's score)."""
        return self._current(layer)["sum"]

    def last(self, layer: int) -> torch.Tensor:
        """The attention the newest query gave each token (TOVA's score, per head)."""
        return self._current(layer)["last"]


def extra_features(
    names: tuple[str, ...] | list[str],
    moments: AttentionMoments,
    layer: int,
    keys: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """The requested extra inputs of one layer's cached tokens, (kv_heads, cache_len, len(names)).

    keys / values: (kv_heads, cache_len, head_dim), the layer's cache in the order ``moments``
    tracks (``attn_*`` need ``moments`` to have observed this layer). Order follows ``names``.
    """
    return extra_columns(names, moments, layer, vector_norms(keys), vector_norms(values))


def extra_columns(
    names: tuple[str, ...] | list[str],
    moments: AttentionMoments | None,
    layer: int,
    key_norms: torch.Tensor | None = None,
    value_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`extra_features` from streamed state: ``key_norms`` / ``value_norms`` are the
    (kv_heads, cache_len) :func:`vector_norms` of the cache (needed only by ``*_norm``)."""
    unknown = [n for n in names if n not in EXTRA_FEATURES]
    if unknown:
        raise ValueError(f"Unknown extra features {unknown}; known: {', '.join(EXTRA_FEATURES)}.")
    columns = []
    for name in names:
        if name == "value_norm":
            columns.append(relative_log(_required(value_norms, name)))
        elif name == "key_norm":
            columns.append(relative_log(_required(key_norms, name)))
        elif name == "attn_var":
            columns.append((_required(moments, name).variance(layer) + LOG_EPS).log())
        elif name == "attn_entropy":
            columns.append(_required(moments, name).entropy(layer))
        elif name == "attn_sum":
            columns.append((_required(moments, name).accumulated(layer) + LOG_EPS).log())
        elif name == "attn_last":
            columns.append((_required(moments, name).last(layer) + LOG_EPS).log())
        else:
            columns.append((_required(moments, name).peak(layer) + LOG_EPS).log())
    return torch.stack([c.float() for c in columns], dim=-1)


def _required(state, name: str):
    if state is None:
        raise ValueError(f"extra feature {name!r} needs state that was not collected.")
    return state


__all__ = ["EXTRA_FEATURES", "NAMM_EXTRAS", "AttentionMoments", "a_log_a", "extra_columns", "extra_features", "relative_log",
           "relative_log_norm", "vector_norms"]
