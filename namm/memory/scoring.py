"""Scoring networks of a NAMM: BAM (backward attention memory) and a per-token MLP.

A scorer maps each cached token's features z (25 dims) to a score; tokens scoring below zero may
be evicted. Both scorers keep *all* their parameters in one flat vector laid out exactly as the
reference's parameter vector, so released checkpoints load as is and evolution (CMA-ES) sees
"parameter vector in, fitness out". All-zero parameters give all-zero scores: keep everything.

BAM (Cetin et al., arXiv 2410.13166, section 3.2; namm-algorithm.md section 3) lets each token
attend to itself and the *newer* tokens of the same head, so it can tell which information has
been superseded::

    q | k | v = z W1 + b1                        W1: (25, 96), one head of width 32
    y         = softmax(q k^T / sqrt(32) + M) v  M[i, j] = -inf for j < i ("backward" mask)
    res | mul = y W2 + b2                        W2: (32, 50)
    z'        = z * (1 + mul) + res
    score     = z' w3 + b3                       w3: (25,)

Flat layout: [W1 (row-major, in x out), b1, W2, b2, w3, b3] = 2400 + 96 + 1600 + 50 + 25 + 1 = 4172.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SCORERS = ("bam", "mlp")


@dataclass(frozen=True)
class ScorerConfig:
    """Which scoring network, and its sizes.

    kind:         "bam" (released NAMM) or "mlp" (per-token MLP, no cross-token interaction).
    hidden_dim:   BAM attention width (released: 32).
    mlp_hidden:   MLP hidden width (None: the input width, as in the reference).
    mlp_depth:    number of linear layers of the MLP (1: a single linear layer input -> 1).
    mlp_residual: residual connections around the MLP's intermediate layers.
    """

    kind: str = "bam"
    hidden_dim: int = 32
    mlp_hidden: int | None = None
    mlp_depth: int = 1
    mlp_residual: bool = True

    def __post_init__(self) -> None:
        if self.kind not in SCORERS:
            raise ValueError(f"Unknown scorer {self.kind!r}; known scorers: {', '.join(SCORERS)}.")
        if not (isinstance(self.hidden_dim, int) and self.hidden_dim > 0):
            raise ValueError(f"hidden_dim must be a positive integer, got {self.hidden_dim!r}.")
        if not (isinstance(self.mlp_depth, int) and self.mlp_depth >= 1):
            raise ValueError(f"mlp_depth must be an integer >= 1, got {self.mlp_depth!r}.")
        if self.mlp_hidden is not None and not (isinstance(self.mlp_hidden, int) and self.mlp_hidden > 0):
            raise ValueError(f"mlp_hidden must be a positive integer or None, got {self.mlp_hidden!r}.")


class FlatScorer:
    """A network whose parameters are views into one flat vector.

    Subclasses list their blocks in ``shapes`` (name -> shape) in the reference order; the blocks
    are exposed as attributes-like views through ``block(name)``.
    """

    shapes: dict[str, tuple[int, ...]]

    def __init__(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.flat = torch.zeros(self.num_params, dtype=dtype, device=device)

    @property
    def num_params(self) -> int:
        total = 0
        for shape in self.shapes.values():
            total += int(torch.Size(shape).numel())
        return total

    def get_flat(self) -> torch.Tensor:
        """A copy of the flat parameter vector, (num_params,)."""
        return self.flat.detach().clone()

    def set_flat(self, vec: torch.Tensor) -> None:
        """Load a flat parameter vector in the reference layout."""
        vec = torch.as_tensor(vec)
        if vec.dim() != 1 or vec.numel() != self.num_params:
            raise ValueError(
                f"{type(self).__name__} needs a flat vector of {self.num_params} parameters, "
                f"got shape {tuple(vec.shape)}."
            )
        self.flat = vec.detach().to(self.flat.device, self.flat.dtype).clone()

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FlatScorer:
        self.flat = self.flat.to(device=device, dtype=dtype)
        return self

    def blocks(self) -> dict[str, torch.Tensor]:
        """Name -> view of the flat vector, in layout order."""
        out, start = {}, 0
        for name, shape in self.shapes.items():
            size = int(torch.Size(shape).numel())
            out[name] = self.flat[start : start + size].view(shape)
            start += size
        return out

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.forward(z.to(self.flat.dtype))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class BAMScorer(FlatScorer):
    """Backward attention memory: one self-attention head over a head's tokens, then a linear head.

    forward(z): z (batch, tokens, dim) -> scores (batch, tokens); batch = any stack of
    (layer, KV head) token sets of equal length; tokens are in chronological order.
    """

    def __init__(self, input_dim: int = 25, hidden_dim: int = 32, **kwargs) -> None:
        self.input_dim, self.hidden_dim = input_dim, hidden_dim
        self.shapes = {
            "w_qkv": (input_dim, 3 * hidden_dim),
            "b_qkv": (3 * hidden_dim,),
            "w_out": (hidden_dim, 2 * input_dim),
            "b_out": (2 * input_dim,),
            "w_head": (input_dim,),
            "b_head": (1,),
        }
        super().__init__(**kwargs)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        p = self.blocks()
        batch, tokens, dim = z.shape
        # backward mask (token i sees j >= i) == causal mask on the time-reversed sequence; every
        # other step is per token, so the whole network runs on reversed tokens (one flip each way)
        zr = z.flip(-2).reshape(batch * tokens, dim)
        qkv = torch.addmm(p["b_qkv"], zr, p["w_qkv"]).view(1, batch, tokens, 3 * self.hidden_dim)
        # the batch on the head axis of a 4-D call lets CPU SDPA use its tiled (flash) kernel
        # instead of materialising (batch, tokens, tokens) scores
        q, k, v = qkv.split(self.hidden_dim, dim=-1)  # 3 x (1, batch, tokens, hidden)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).reshape(batch * tokens, self.hidden_dim)
        res, mul = torch.addmm(p["b_out"], y, p["w_out"]).chunk(2, dim=-1)  # 2 x (batch * tokens, dim)
        zr = zr * (1.0 + mul) + res
        return torch.addmv(p["b_head"], zr, p["w_head"]).view(batch, tokens).flip(-1)  # (batch, tokens)


class MLPScorer(FlatScorer):
    """Per-token MLP: ``depth`` linear layers with ReLU, residual around the intermediate ones.

    Layout per layer: [W (in x out, row-major), b]. Unlike the reference, intermediate layers
    compute relu(linear(h)) (the reference computes relu(h) for depth > 2).
    """

    def __init__(self, input_dim: int = 25, hidden: int | None = None, depth: int = 1,
                 residual: bool = True, **kwargs) -> None:
        hidden = input_dim if hidden is None else hidden
        self.input_dim, self.hidden, self.depth, self.residual = input_dim, hidden, depth, residual
        dims = [input_dim] + [hidden] * (depth - 1) + [1]
        self.shapes = {}
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            self.shapes[f"w{i}"] = (d_in, d_out)
            self.shapes[f"b{i}"] = (d_out,)
        super().__init__(**kwargs)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        p = self.blocks()
        h = z
        for i in range(self.depth - 1):
            out = torch.relu(h @ p[f"w{i}"] + p[f"b{i}"])  # (batch, tokens, hidden)
            h = h + out if (self.residual and i > 0) else out
        last = self.depth - 1
        return (h @ p[f"w{last}"] + p[f"b{last}"]).squeeze(-1)  # (batch, tokens)


def score_ragged(scorer: FlatScorer, features: list[torch.Tensor], slack: float = 1.25,
                 max_rows: int = 1 << 15) -> list[torch.Tensor]:
    """Score several token sets of unequal length (e.g. every layer of a step) in batched calls.

    features: list of (heads_i, n_i, dim), tokens chronological. The sets are LEFT-padded with
    zeros to a common length and stacked on the batch axis. BAM's backward mask lets a token see
    only itself and newer tokens, so a real token never sees the older padding; the MLP scores
    each token alone. Padding costs BAM O(n_max^2) per head, so sets are grouped by length, a
    group growing while its padded cost stays within ``slack`` x its unpadded cost and it holds at
    most ``max_rows`` (batch x tokens) rows: on CPU, calls much larger than that run slower (the
    intermediates leave the cache), while per-layer calls waste little. Returns the scores of
    each set, (heads_i, n_i), in the input order.
    """
    order = sorted(range(len(features)), key=lambda i: -features[i].shape[1])  # longest first
    groups: list[list[int]] = []
    for i in order:
        if groups:
            group = groups[-1] + [i]
            longest = features[group[0]].shape[1]
            heads = sum(features[j].shape[0] for j in group)
            unpadded = sum(features[j].shape[0] * features[j].shape[1] ** 2 for j in group)
            if heads * longest**2 <= slack * unpadded and heads * longest <= max_rows:
                groups[-1] = group
                continue
        groups.append([i])
    out: list[torch.Tensor | None] = [None] * len(features)
    for group in groups:
        longest = features[group[0]].shape[1]
        z = torch.cat([F.pad(features[j], (0, 0, longest - features[j].shape[1], 0)) for j in group])
        scores = scorer(z)  # (sum of heads, longest)
        for j, part in zip(group, scores.split([features[j].shape[0] for j in group])):
            out[j] = part[:, longest - features[j].shape[1] :]
    return out  # type: ignore[return-value]


def build_scorer(config: ScorerConfig, input_dim: int, dtype: torch.dtype = torch.float32) -> FlatScorer:
    """The scorer described by ``config`` for features of width ``input_dim``, all-zero params."""
    if config.kind == "bam":
        return BAMScorer(input_dim, config.hidden_dim, dtype=dtype)
    return MLPScorer(input_dim, config.mlp_hidden, config.mlp_depth, config.mlp_residual, dtype=dtype)


__all__ = ["SCORERS", "BAMScorer", "FlatScorer", "MLPScorer", "ScorerConfig", "build_scorer", "score_ragged"]
