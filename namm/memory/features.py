"""Token features of a NAMM: attention spectrogram, EMA, normalisation and recency embedding.

Every cached token k of a layer and KV head is described by the attention it receives from the
queries over time, x_k[q] = A[q, k]. Its short-time Fourier transform (n_fft 32, hop 16, periodic
Hann window, magnitudes, 17 bins) is folded frame by frame into an exponential moving average,
normalised with frozen per-bin statistics and joined with a sinusoidal embedding of the token's
age: ``z_k = [recency(r_k) (8), (E_k - mu) / sigma (17)]`` (Cetin et al., "An Evolved Universal
Transformer Memory", arXiv 2410.13166, section 3.1; namm-algorithm.md section 2).

The reference buffers 512 query rows per layer before computing the spectrogram. Here the
spectrogram is *streamed*: each layer keeps at most ``n_fft - 1`` recent query rows (the 16-row
overlap plus rows not yet forming a hop) and emits a frame as soon as ``hop`` new rows arrive, so
the attention matrix can be dropped right after each forward call. Frame m covers the queries
``16m - 16 .. 16m + 15`` (zeros before query 0), exactly the frames the reference computes at its
eviction steps, and the per-frame EMA ``E <- beta E + (1 - beta) S`` with ``beta = 0.99**16``
equals the reference's per-step formula. All frames a forward call completes are computed at once
(``unfold`` over the query axis, one windowed-DFT matmul, which is the rfft of each frame) and
folded in closed form, ``E <- beta^n E + sum_t (1 - beta) beta^(n-1-t) S_t``.

The last ``T mod hop`` queries are not in any frame yet. With ``partial_frame`` the features that
are *scored* see them as one more, zero-padded frame (so at the end of a prompt the question's
attention counts); the streaming state is untouched and counts that frame once it completes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from namm.memory.buffers import capacity_for, fresh, with_capacity
from namm.memory.extra_features import EXTRA_FEATURES, NAMM_EXTRAS


@dataclass(frozen=True)
class FeatureConfig:
    """Hyperparameters of the token features (defaults: the released NAMM-BAM).

    n_fft / hop:        STFT window and hop over the query axis (periodic Hann, center=False).
    ema_coeff:          EMA coefficient per query token; a frame decays by ``ema_coeff ** hop``.
    recency_dim:        size of the sinusoidal recency embedding (sin half, cos half).
    recency_max_freq:   base of the recency frequencies, w_i = max_freq ** (-i / (dim / 2)).
    norm_eps:           lower bound on the normalisation standard deviation.
    partial_frame:      score with the queries received since the last complete frame folded in
                        as a zero-padded frame (the reference drops them until the frame completes;
                        on its 512/128 grid there are none, except at a prompt-end eviction).
    extras:             optional per-token inputs of :mod:`namm.memory.extra_features` appended
                        after the spectrogram and normalised with it, e.g. ("attn_peak",
                        "attn_entropy", "attn_var"); () is the paper's NAMM.
    depth_basis:        K >= 2: the scorer also knows how deep the layer is. The inputs z are
                        repeated K times, multiplied by the Legendre polynomials P_0 .. P_{K-1} of
                        the layer's relative depth x = 2 * layer / (num_layers - 1) - 1 in [-1, 1]
                        (:func:`depth_basis`), so a linear scorer's weights vary smoothly with depth
                        (w(x) = sum_k w_k P_k(x)); block 0 (P_0 = 1) is the plain inputs, so zero
                        weights on the other blocks are the depth-blind NAMM. 0 (default): the
                        paper's NAMM, one rule for every layer. Relative depth, so the NAMM still
                        runs on a model of any depth.
    """

    n_fft: int = 32
    hop: int = 16
    ema_coeff: float = 0.99
    recency_dim: int = 8
    recency_max_freq: float = 50000.0
    norm_eps: float = 1e-7
    partial_frame: bool = True
    extras: tuple[str, ...] = ()
    depth_basis: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.n_fft, int) and self.n_fft >= 2):
            raise ValueError(f"n_fft must be an integer >= 2, got {self.n_fft!r}.")
        if not (isinstance(self.hop, int) and 1 <= self.hop <= self.n_fft):
            raise ValueError(f"hop must be an integer in [1, n_fft={self.n_fft}], got {self.hop!r}.")
        if not (0.0 <= float(self.ema_coeff) < 1.0):
            raise ValueError(f"ema_coeff must be in [0, 1), got {self.ema_coeff!r}.")
        if not (isinstance(self.recency_dim, int) and self.recency_dim >= 0 and self.recency_dim % 2 == 0):
            raise ValueError(f"recency_dim must be a non-negative even integer, got {self.recency_dim!r}.")
        if self.recency_max_freq <= 0 or self.norm_eps <= 0:
            raise ValueError("recency_max_freq and norm_eps must be positive.")
        if not isinstance(self.partial_frame, bool):
            raise ValueError(f"partial_frame must be true or false, got {self.partial_frame!r}.")
        if not (isinstance(self.depth_basis, int) and not isinstance(self.depth_basis, bool)
                and (self.depth_basis == 0 or 2 <= self.depth_basis <= 8)):
            raise ValueError(f"depth_basis must be 0 (no depth input) or an integer in [2, 8], got {self.depth_basis!r}.")
        self._check_extras()

    def _check_extras(self) -> None:
        if isinstance(self.extras, str) or not isinstance(self.extras, (list, tuple)):
            raise ValueError(f"extras must be a list of names ({', '.join(NAMM_EXTRAS)}), got {self.extras!r}.")
        extras = tuple(self.extras)  # a JSON / TOML list becomes a tuple (hashable, frozen)
        object.__setattr__(self, "extras", extras)
        unknown = [n for n in extras if n not in EXTRA_FEATURES]
        if unknown:
            raise ValueError(f"Unknown extras {unknown}; known: {', '.join(NAMM_EXTRAS)}.")
        unsupported = [n for n in extras if n not in NAMM_EXTRAS]
        if unsupported:
            raise ValueError(f"extras {unsupported} need the cached values, which the engine does not hand to "
                             f"memory policies; use {', '.join(NAMM_EXTRAS)}.")
        if len(set(extras)) != len(extras):
            raise ValueError(f"extras lists a name twice: {list(extras)}.")
        if any(n.startswith("attn_") for n in extras) and not 0.0 < float(self.ema_coeff) < 1.0:
            raise ValueError(f"attention extras need ema_coeff in (0, 1), got {self.ema_coeff!r}.")

    @property
    def n_bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def overlap(self) -> int:
        return self.n_fft - self.hop

    @property
    def frame_decay(self) -> float:
        """beta = ema_coeff ** hop, the EMA coefficient per spectrogram frame."""
        return float(self.ema_coeff) ** self.hop

    @property
    def norm_dim(self) -> int:
        """Inputs normalised with the frozen statistics: the spectrogram bins, then the extras."""
        return self.n_bins + len(self.extras)

    @property
    def input_dim(self) -> int:
        """The inputs before the depth basis: the age embedding, then the normalised columns."""
        return self.recency_dim + self.norm_dim

    @property
    def feature_dim(self) -> int:
        return self.input_dim * max(1, self.depth_basis)


def relative_depth(layer: int, num_layers: int) -> float:
    """A layer's depth in [-1, 1]: -1 the first layer, 1 the last (0 for a one-layer model)."""
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is not one of the model's {num_layers} layers.")
    return 0.0 if num_layers == 1 else 2.0 * layer / (num_layers - 1) - 1.0


def depth_basis(x: float, k: int) -> list[float]:
    """Legendre polynomials P_0(x) .. P_{k-1}(x) (Bonnet's recursion), orthogonal on [-1, 1]."""
    if not -1.0 <= x <= 1.0:
        raise ValueError(f"relative depth must be in [-1, 1], got {x!r}.")
    values = [1.0, float(x)][:k]
    for n in range(1, k - 1):
        values.append(((2 * n + 1) * x * values[n] - n * values[n - 1]) / (n + 1))
    return values


class StreamingSpectrogram:
    """Per-layer streaming STFT + EMA of the attention each cached token receives.

    State per layer: the last r < n_fft query rows still needed by future frames, (kv_heads, r,
    cache_len) (:attr:`rows`), and the EMA, (kv_heads, cache_len, n_bins) (:meth:`ema`). New
    tokens enter with a zero EMA and zero history (the attention they got before they existed is
    zero anyway). Both live in buffers with spare capacity (:mod:`namm.memory.buffers`): a decoding
    step writes its attention row and the new token's slots in place, no copy of the state.
    """

    def __init__(self, config: FeatureConfig) -> None:
        self.config = config
        self._rows: dict[int, torch.Tensor] = {}  # layer -> (kv_heads, n_fft, capacity)
        self._emas: dict[int, torch.Tensor] = {}  # layer -> (kv_heads, n_bins, capacity): bins, then tokens
        self._n_rows: dict[int, int] = {}
        self._n_tokens: dict[int, int] = {}
        self._dft: torch.Tensor | None = None

    def reset(self) -> None:
        for state in (self._rows, self._emas, self._n_rows, self._n_tokens):
            state.clear()

    @property
    def rows(self) -> dict[int, torch.Tensor]:
        """Layer -> the buffered query rows, (kv_heads, r, cache_len) (views)."""
        return {layer: self._rows_view(layer) for layer in self._rows}

    def _rows_view(self, layer: int) -> torch.Tensor:
        return self._rows[layer][:, : self._n_rows[layer], : self._n_tokens[layer]]

    def dft(self, like: torch.Tensor) -> torch.Tensor:
        """The windowed real DFT as a matrix, (2 * n_bins, n_fft): rows w[n] cos(2 pi f n / N),
        then -w[n] sin(...). ``dft @ frame`` is rfft(window * frame) as (real; imaginary); for
        n_fft = 32 one matmul is about twice as fast as ``torch.fft.rfft`` + complex ``abs`` on CPU."""
        m = self._dft
        if m is None or m.dtype != like.dtype or m.device != like.device:
            n_fft = self.config.n_fft
            window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
            angle = torch.outer(torch.arange(self.config.n_bins, dtype=torch.float64),
                                torch.arange(n_fft, dtype=torch.float64)) * (2 * math.pi / n_fft)
            m = torch.cat([angle.cos() * window, -angle.sin() * window]).to(like.device, like.dtype)
            self._dft = m
        return m

    def spectrum(self, frames: torch.Tensor) -> torch.Tensor:
        """|rfft(window * frame)| of frames laid out along the query axis.

        frames: (..., m, cache_len), the first m <= n_fft rows of each frame (the rest are zeros).
        Returns (..., n_bins, cache_len).
        """
        *lead, m, cache_len = frames.shape
        dft = self.dft(frames)[:, :m]
        x = frames.new_empty(*lead, dft.shape[0], cache_len)  # (..., 2 * n_bins, cache_len): real; imaginary
        if frames.dim() == 4 and lead[1] == 1:  # one frame per head (a decoding step completed it)
            torch.matmul(dft, frames[:, 0], out=x[:, 0])
        elif frames.dim() == 4:  # (kv_heads, n_frames, m, cache_len): overlapping frames, one batch per head
            for head in range(lead[0]):  # each head's frames are strided views, multiplied without a copy
                torch.matmul(dft.expand(lead[1], -1, -1), frames[head], out=x[head])
        else:
            torch.matmul(dft.expand(*lead, -1, -1), frames, out=x)
        n_bins = self.config.n_bins
        real, imag = x[..., :n_bins, :], x[..., n_bins:, :]
        # |real + i imaginary|: sqrt(re^2 + im^2) runs vectorised, 1.7x faster than torch.hypot on
        # CPU (no overflow to guard against: the DFT of probabilities is at most n_fft)
        return torch.addcmul(real * real, imag, imag).sqrt_()

    def observe(self, layer: int, attn: torch.Tensor) -> None:
        """Fold one forward call's attention (kv_heads, new_queries, cache_len) into the EMA."""
        cfg = self.config
        heads, n_new, cache_len = attn.shape
        if layer not in self._rows:  # zero padding before query 0
            self._rows[layer] = attn.new_zeros(heads, cfg.n_fft, capacity_for(cache_len))
            self._emas[layer] = attn.new_zeros(heads, cfg.n_bins, capacity_for(cache_len))
            self._n_rows[layer], self._n_tokens[layer] = cfg.overlap, 0
        self._grow(layer, cache_len)  # older queries gave new keys zero attention
        n_rows = self._n_rows[layer] + n_new
        if n_rows <= cfg.n_fft:  # a decoding step: its rows go into the buffer
            self._rows[layer][:, self._n_rows[layer] : n_rows, :cache_len] = attn
            rows = self._rows[layer][:, :n_rows, :cache_len]
        else:  # a chunk: (kv_heads, r + new_queries, cache_len), dropped once its frames are read
            rows = torch.cat([self._rows_view(layer), attn.to(self._rows[layer].dtype)], dim=1)

        n_frames = (n_rows - cfg.overlap) // cfg.hop  # frames m with m * hop + n_fft <= rows
        if n_frames > 0:
            used = rows[:, : (n_frames - 1) * cfg.hop + cfg.n_fft]
            frames = used.unfold(1, cfg.n_fft, cfg.hop).transpose(-1, -2)  # (kv_heads, n_frames, n_fft, cache_len)
            spectra = self.spectrum(frames)  # (kv_heads, n_frames, n_bins, cache_len)
            beta = cfg.frame_decay
            exponents = torch.arange(n_frames - 1, -1, -1, dtype=rows.dtype, device=rows.device)
            weights = (1.0 - beta) * beta**exponents  # (n_frames,), the newest frame last
            ema = self._emas[layer][:, :, :cache_len]  # (kv_heads, n_bins, cache_len)
            ema.mul_(beta**n_frames).add_(torch.matmul(weights, spectra.flatten(2)).view_as(ema))
        self._keep_rows(layer, rows, n_frames * cfg.hop)

    def _grow(self, layer: int, cache_len: int) -> None:
        """Give the ``cache_len - tracked`` new tokens zero rows and a zero EMA.

        No write is needed: every slot past the tracked tokens is zero. Buffers are allocated
        zeroed (:mod:`namm.memory.buffers`) and every write covers tracked tokens only, so a
        decoding step costs one row write (``tests/memory/test_features.py`` checks the spare slots).
        """
        old = self._n_tokens[layer]
        if cache_len < old:
            raise RuntimeError(
                f"layer {layer}: attention covers {cache_len} keys but the policy tracks {old}; "
                "the engine must call select()/prune before handing a smaller cache."
            )
        if cache_len > min(self._rows[layer].shape[2], self._emas[layer].shape[2]):
            self._rows[layer] = with_capacity(self._rows[layer], 2, old, cache_len)
            self._emas[layer] = with_capacity(self._emas[layer], 2, old, cache_len)
        self._n_tokens[layer] = cache_len

    def _keep_rows(self, layer: int, rows: torch.Tensor, start: int) -> None:
        """Keep ``rows[:, start:]`` (< n_fft rows) as the layer's buffered rows."""
        buffer, left = self._rows[layer], rows[:, start:]
        n_left, cache_len = left.shape[1], rows.shape[-1]
        if rows.data_ptr() != buffer.data_ptr():  # a chunk's rows
            buffer[:, :n_left, :cache_len] = left
        elif start > 0:  # a frame completed in the buffer: move the rows it leaves to the top
            buffer[:, :n_left, :cache_len] = left.clone() if start < n_left else left
        self._n_rows[layer] = n_left

    def ema(self, layer: int) -> torch.Tensor:
        """The un-normalised EMA spectrogram of every cached token, (kv_heads, cache_len, n_bins)."""
        if layer not in self._emas:
            raise KeyError(f"layer {layer} has not been observed yet.")
        return self._emas[layer][:, :, : self._n_tokens[layer]].transpose(1, 2)

    def pending(self, layer: int) -> int:
        """Query rows received since the last complete frame (``T mod hop``)."""
        return self._n_rows[layer] - self.config.overlap if layer in self._rows else 0

    def scoring_ema(self, layer: int) -> torch.Tensor:
        """The EMA the scorer sees, (kv_heads, cache_len, n_bins); the state is not changed.

        With ``partial_frame`` and pending rows, the next frame (overlap rows, pending rows, zeros
        for the queries still to come) is folded in as one more EMA frame.
        """
        ema = self.ema(layer)
        if not self.config.partial_frame or self.pending(layer) == 0:
            return ema
        beta = self.config.frame_decay
        spectrum = self.spectrum(self._rows_view(layer))  # (kv_heads, n_bins, cache_len); zero padding adds nothing
        return (beta * ema.transpose(1, 2) + (1.0 - beta) * spectrum).transpose(1, 2)

    def prune(self, layer: int, keep_idx: torch.Tensor) -> None:
        """Keep only the tokens ``keep_idx`` (kv_heads, n_keep) of ``layer``."""
        rows, ema = self._rows_view(layer), self.ema(layer).transpose(1, 2)  # (kv_heads, n_bins, cache_len)
        heads, n_rows, _ = rows.shape
        n_keep = keep_idx.shape[-1]
        keep_idx = keep_idx.to(rows.device)
        kept_rows = rows.gather(2, keep_idx[:, None, :].expand(heads, n_rows, n_keep))
        buffer = rows.new_zeros(heads, self.config.n_fft, capacity_for(n_keep))
        buffer[:, :n_rows, :n_keep] = kept_rows
        self._rows[layer] = buffer
        self._emas[layer] = fresh(ema.gather(2, keep_idx[:, None, :].expand(heads, ema.shape[1], n_keep)), 2)
        self._n_tokens[layer] = n_keep


class RunningStats:
    """Per-bin mean and variance, merged with the parallel (Chan et al.) formula.

    ``n_bins`` columns: the spectrogram bins and then any extra inputs (``FeatureConfig.norm_dim``).

    The reference collects them over every layer, head, token and eviction step of keep-all runs
    and then freezes them (namm-algorithm.md section 2.4 and 5). Kept in float64.
    """

    def __init__(self, n_bins: int, count: float = 0.0, mean: torch.Tensor | None = None,
                 m2: torch.Tensor | None = None) -> None:
        self.n_bins = n_bins
        self.count = float(count)
        self.mean = torch.zeros(n_bins, dtype=torch.float64) if mean is None else mean.to(torch.float64).cpu()
        self.m2 = torch.zeros(n_bins, dtype=torch.float64) if m2 is None else m2.to(torch.float64).cpu()

    @classmethod
    def from_mean_var(cls, count: float, mean: torch.Tensor, var: torch.Tensor) -> RunningStats:
        return cls(mean.numel(), count, mean, var.to(torch.float64) * float(count))

    @property
    def var(self) -> torch.Tensor:
        """Population variance per bin, (n_bins,)."""
        return self.m2 / self.count if self.count > 0 else torch.ones_like(self.m2)

    def update(self, values: torch.Tensor) -> None:
        """Merge a batch of values (..., n_bins)."""
        x = values.detach().reshape(-1, self.n_bins).to(torch.float64).cpu()
        if x.shape[0] == 0:
            return
        self.merge(RunningStats(self.n_bins, x.shape[0], x.mean(0), ((x - x.mean(0)) ** 2).sum(0)))

    def merge(self, other: RunningStats) -> None:
        total = self.count + other.count
        if other.count == 0:
            return
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / total)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / total)
        self.count = total

    def normalize(self, ema: torch.Tensor, eps: float) -> torch.Tensor:
        """(E - mu) / max(sigma, eps) per bin."""
        mean = self.mean.to(ema.device, ema.dtype)
        std = self.var.sqrt().clamp_min(eps).to(ema.device, ema.dtype)
        return (ema - mean) / std

    def copy(self) -> RunningStats:
        return RunningStats(self.n_bins, self.count, self.mean.clone(), self.m2.clone())


def recency_embedding(
    positions: torch.Tensor, dim: int, max_freq: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Sinusoidal embedding of each token's age r = p_newest - p, (kv_heads, cache_len, dim).

    emb(r) = [sin(r w_0 .. r w_{d/2-1}), cos(...)], w_i = max_freq ** (-i / (d / 2)); the newest
    token has r = 0. Computed in float64 so large ages stay exact, returned as ``dtype``.
    """
    half = dim // 2
    age = (positions[..., -1:] - positions).to(torch.float64)  # (kv_heads, cache_len)
    freqs = max_freq ** (-torch.arange(half, dtype=torch.float64, device=positions.device) / max(half, 1))
    angles = age[..., None] * freqs  # (kv_heads, cache_len, half)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)


def token_features(
    ema: torch.Tensor,
    positions: torch.Tensor,
    config: FeatureConfig,
    stats: RunningStats | None,
    extras: torch.Tensor | None = None,
    depth: float | None = None,
) -> torch.Tensor:
    """The NAMM input z = [recency (recency_dim), normalised EMA (n_bins), normalised extras],
    (kv_heads, cache_len, feature_dim); with a ``depth_basis`` of K, [z * P_0(x), ..., z * P_{K-1}(x)].

    ema: (kv_heads, cache_len, n_bins); positions: (kv_heads, cache_len) absolute, newest last;
    extras: (kv_heads, cache_len, len(config.extras)), required when the config has extras;
    depth: the layer's :func:`relative_depth`, required when the config has a depth basis.
    Without statistics (an uncalibrated NAMM) the EMA and extras are used as is.
    """
    inputs = normalised_inputs(ema, config, extras)
    inputs = inputs if stats is None else stats.normalize(inputs, config.norm_eps)
    recency = recency_embedding(positions.to(ema.device), config.recency_dim, config.recency_max_freq, ema.dtype)
    z = torch.cat([recency, inputs], dim=-1)
    if not config.depth_basis:
        return z
    if depth is None:
        raise ValueError("this NAMM reads the layer's depth (depth_basis > 0): pass depth=relative_depth(layer, "
                         "num_layers).")
    return torch.cat([z * p for p in depth_basis(depth, config.depth_basis)], dim=-1)


def normalised_inputs(ema: torch.Tensor, config: FeatureConfig, extras: torch.Tensor | None) -> torch.Tensor:
    """The columns the frozen statistics cover: EMA then extras, (kv_heads, cache_len, norm_dim)."""
    n_extra = 0 if extras is None else extras.shape[-1]
    if n_extra != len(config.extras):
        raise ValueError(f"the features have {len(config.extras)} extras {list(config.extras)}, "
                         f"got {n_extra} extra columns.")
    return ema if extras is None or n_extra == 0 else torch.cat([ema, extras.to(ema.dtype)], dim=-1)


__all__ = [
    "FeatureConfig",
    "RunningStats",
    "StreamingSpectrogram",
    "normalised_inputs",
    "depth_basis",
    "recency_embedding",
    "relative_depth",
    "token_features",
]
