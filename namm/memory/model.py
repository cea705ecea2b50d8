"""The NAMM object: configuration, flat parameter vector, frozen normalisation, save and load.

A Neural Attention Memory Model (Cetin et al., "An Evolved Universal Transformer Memory", arXiv
2410.13166) is a small network shared by every layer and KV head of a transformer. It scores
each cached token from the attention the token received (see ``features``) and the tokens that
score below zero are evicted (see ``selection``). What is stored is tiny: a config, one flat
parameter vector (4172 floats for the released BAM) and 17 per-bin normalisation statistics (one
more per optional extra input, ``FeatureConfig.extras``).

On disk a NAMM is a folder with ``config.json`` and ``namm.safetensors`` (tensors ``params`` and,
once calibrated, ``norm.count``, ``norm.mean``, ``norm.m2``). Pretrained NAMMs shipped with the
package live in ``namm/pretrained/<name>/``, each with a ``provenance.json`` (the run it was evolved
in, see :mod:`namm.evolution.export`); :func:`default_pretrained` picks the one for a model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from namm.memory.features import FeatureConfig, RunningStats, token_features
from namm.memory.scoring import FlatScorer, ScorerConfig, build_scorer, score_ragged
from namm.memory.selection import check_carry

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "namm.safetensors"
PROVENANCE_FILE = "provenance.json"
FORMAT = "namm"
FORMAT_VERSION = 1
KEEP_MODES = ("threshold", "budget")
SCHEDULE_KEYS = ("chunk_size", "delay", "evict_at_prefill_end", "evict_during_prefill")


@dataclass(frozen=True)
class NAMMConfig:
    """Everything that defines a NAMM besides its parameters.

    The conditions the NAMM was evolved under are recorded here and are what ``namm generate``,
    ``namm eval`` and :class:`~namm.engine.Engine` run it under by default (trained = evaluated =
    shipped); explicit flags or arguments override them. Folders saved before a field existed
    load with its default.

    delay / chunk_size:   eviction period and prefill chunk (reference: 512 / 128).
    evict_at_prefill_end: also evict once when the prompt ends (the reference does not).
    evict_during_prefill: evict on the ``delay`` grid while reading the prompt.
    chat:                 prompts wrapped in the tokenizer's chat template (True), raw (False), or
                          None: the template if the tokenizer has one (what runs before this field
                          existed did).
    keep:                 "threshold": keep tokens scoring >= ``threshold`` (the paper's emergent
                          size), at most ``max_cache`` per layer if set; "budget": every layer and KV
                          head keeps its top-k scores, k = ceil(keep_ratio * tokens seen).
    threshold:            keep rule score >= threshold (reference: 0).
    max_cache:            optional cap on tokens kept per layer in threshold mode (reference: none).
    keep_ratio:           the budget mode's fraction of tokens kept.
    score_pool:           odd width of a max-pool of each head's scores along the cache before
                          selection: a token scores the best of itself and its ``score_pool // 2``
                          neighbours on either side, so multi-token spans are kept whole (1: off,
                          the reference).
    score_carry:          each head's score of a token carries to the ``score_carry`` tokens after it,
                          less ``score_carry_decay`` per token (:func:`~namm.memory.selection.carry_scores`):
                          a strong start keeps the span that follows it (0: off, the reference).
    score_carry_decay:    the carried score's drop per token of distance (>= 0).
    evolved_on:           the model id the NAMM was evolved on (informational).
    """

    features: FeatureConfig = field(default_factory=FeatureConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    delay: int = 512
    chunk_size: int = 128
    evict_at_prefill_end: bool = True
    evict_during_prefill: bool = True
    chat: bool | None = None
    keep: str = "threshold"
    threshold: float = 0.0
    max_cache: int | None = None
    keep_ratio: float | None = None
    score_pool: int = 1
    score_carry: int = 0
    score_carry_decay: float = 0.0
    evolved_on: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.features, dict):
            object.__setattr__(self, "features", _from_dict(FeatureConfig, self.features, "features"))
        if isinstance(self.scorer, dict):
            object.__setattr__(self, "scorer", _from_dict(ScorerConfig, self.scorer, "scorer"))
        for name in ("delay", "chunk_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.max_cache is not None and not (isinstance(self.max_cache, int) and self.max_cache > 0):
            raise ValueError(f"max_cache must be a positive integer or None, got {self.max_cache!r}.")
        for name in ("evict_at_prefill_end", "evict_during_prefill"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}.")
        if self.chat is not None and not isinstance(self.chat, bool):
            raise ValueError(f"chat must be true, false or null, got {self.chat!r}.")
        check_keep(self.keep, self.keep_ratio, self.max_cache)
        if isinstance(self.score_pool, bool) or not isinstance(self.score_pool, int) or self.score_pool < 1 \
                or self.score_pool % 2 == 0:
            raise ValueError(f"score_pool must be a positive odd number of tokens (1: no pooling), "
                             f"got {self.score_pool!r}.")
        check_carry(self.score_carry, self.score_carry_decay)

    @property
    def schedule(self) -> dict[str, Any]:
        """The engine schedule the NAMM was evolved with (``EngineConfig`` keyword arguments)."""
        return schedule_of(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NAMMConfig:
        return _from_dict(cls, data, "NAMM config")


def schedule_of(config: Any) -> dict[str, Any]:
    """The schedule fields (:data:`SCHEDULE_KEYS`) of an ``EngineConfig`` or a ``NAMMConfig``."""
    return {key: getattr(config, key) for key in SCHEDULE_KEYS}


def check_keep(keep: str, keep_ratio: float | None, max_cache: int | None) -> None:
    """Validate a keep mode: "threshold" (optional ``max_cache``) or "budget" with a ``keep_ratio``."""
    if keep not in KEEP_MODES:
        raise ValueError(f"keep must be one of {KEEP_MODES}, got {keep!r}.")
    if keep == "budget":
        if keep_ratio is None or isinstance(keep_ratio, bool) or not 0 < float(keep_ratio) <= 1:
            raise ValueError(f"keep = \"budget\" needs keep_ratio in (0, 1], got {keep_ratio!r}.")
        if max_cache is not None:
            raise ValueError("max_cache caps the threshold mode; with keep = \"budget\" the size is keep_ratio.")
    elif keep_ratio is not None:
        raise ValueError(f"keep_ratio = {keep_ratio!r} only applies to keep = \"budget\"; the threshold mode's "
                         "size is emergent (cap it with max_cache).")


def _from_dict(cls: type, data: dict[str, Any], what: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"Unknown {what} keys {unknown}; known keys: {sorted(known)}.")
    return cls(**data)


class NAMM:
    """A Neural Attention Memory Model: config + scorer parameters + frozen feature statistics.

    Parameters
    ----------
    config : NAMMConfig, optional
        Feature, scorer and schedule hyperparameters (defaults: the released NAMM-BAM).
    params : torch.Tensor, optional
        Flat parameter vector in the reference layout; zeros (keep every token) when omitted.
    norm : RunningStats, optional
        Frozen per-bin statistics of the EMA spectrogram; None until calibrated, in which case
        the EMA enters the scorer un-normalised.
    """

    def __init__(self, config: NAMMConfig | None = None, params: torch.Tensor | None = None,
                 norm: RunningStats | None = None) -> None:
        self.config = config or NAMMConfig()
        self.scorer: FlatScorer = build_scorer(self.config.scorer, self.config.features.feature_dim)
        if params is not None:
            self.set_flat(params)
        expected = self.config.features.norm_dim
        if norm is not None and norm.n_bins != expected:
            raise ValueError(f"norm has {norm.n_bins} columns, the features normalise {expected} "
                             f"({self.config.features.n_bins} bins + extras {list(self.config.features.extras)}).")
        self.norm = norm

    def __repr__(self) -> str:
        cfg = self.config
        return (f"NAMM(scorer={cfg.scorer.kind}, params={self.num_params}, "
                f"calibrated={self.norm is not None}, evolved_on={cfg.evolved_on!r})")

    # ---- parameters -------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return self.scorer.num_params

    def get_flat(self) -> torch.Tensor:
        return self.scorer.get_flat()

    def set_flat(self, vec: torch.Tensor) -> None:
        vec = torch.as_tensor(vec)
        if vec.numel() == self.num_params and not torch.isfinite(vec).all():
            raise ValueError("NAMM parameters contain NaN or inf values.")
        self.scorer.set_flat(vec)

    def with_params(self, vec: torch.Tensor) -> NAMM:
        """A NAMM with the same config and statistics and new parameters (for evolution)."""
        return NAMM(self.config, vec, self.norm)

    def with_norm(self, norm: RunningStats | None) -> NAMM:
        """A NAMM with the same config and parameters and new (frozen) statistics."""
        return NAMM(self.config, self.get_flat(), None if norm is None else norm.copy())

    def with_config(self, **changes: Any) -> NAMM:
        """A NAMM with some top-level config fields changed (e.g. max_cache); same scorer."""
        config = replace(self.config, **changes)
        if config.scorer != self.config.scorer or config.features != self.config.features:
            raise ValueError("with_config cannot change the scorer or the features of a trained NAMM.")
        return NAMM(config, self.get_flat(), self.norm)

    # ---- inference --------------------------------------------------------------------------
    def features(self, ema: torch.Tensor, positions: torch.Tensor, extras: torch.Tensor | None = None,
                 depth: float | None = None) -> torch.Tensor:
        """Token features (kv_heads, cache_len, feature_dim) from the EMA spectrogram, positions,
        the configured extra inputs (kv_heads, cache_len, len(extras)), if any, and the layer's
        relative depth (:func:`namm.memory.features.relative_depth`) if the NAMM reads it."""
        return token_features(ema, positions, self.config.features, self.norm, extras, depth)

    def score(self, ema: torch.Tensor, positions: torch.Tensor, extras: torch.Tensor | None = None,
              depth: float | None = None) -> torch.Tensor:
        """Scores (kv_heads, cache_len) of one layer's cached tokens; >= threshold means keep."""
        z = self.features(ema, positions, extras, depth)
        return self._scorer_on(z.device)(z)

    def score_layers(self, emas: list[torch.Tensor], positions: list[torch.Tensor],
                     extras: list[torch.Tensor | None] | None = None,
                     depths: list[float | None] | None = None) -> list[torch.Tensor]:
        """:meth:`score` of several layers (cache lengths may differ) in batched scorer calls."""
        extras = extras if extras is not None else [None] * len(emas)
        depths = depths if depths is not None else [None] * len(emas)
        return self.score_features([self.features(ema, pos, ext, d)
                                    for ema, pos, ext, d in zip(emas, positions, extras, depths)])

    def score_features(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Scores (kv_heads, cache_len_i) of several layers' :meth:`features` in batched scorer calls."""
        return score_ragged(self._scorer_on(features[0].device), features) if features else []

    def _scorer_on(self, device: torch.device) -> FlatScorer:
        if self.scorer.flat.device != device:
            self.scorer.to(device=device)
        return self.scorer

    # ---- save / load ------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``namm.safetensors`` into ``directory`` (created if needed)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"params": self.get_flat().cpu().contiguous()}
        if self.norm is not None:
            tensors["norm.count"] = torch.tensor([self.norm.count], dtype=torch.float64)
            tensors["norm.mean"] = self.norm.mean.contiguous()
            tensors["norm.m2"] = self.norm.m2.contiguous()
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "num_params": self.num_params,
                "calibrated": self.norm is not None, **self.config.to_dict()}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> NAMM:
        """Load a NAMM folder, or a pretrained NAMM shipped in ``namm/pretrained/<name>``."""
        from namm.memory.checkpoint import read_pretrained

        config, params, norm = read_pretrained(resolve_pretrained(name_or_path))
        return cls(config, params, norm)

    @classmethod
    def from_reference(cls, path: str | Path, config: NAMMConfig | None = None, key: str | None = None,
                       norm: RunningStats | None = None) -> NAMM:
        """Load a flat parameter vector in the reference layout from a .pt / .safetensors / .npy file.

        ``key`` picks a tensor inside a checkpoint dict (nested keys joined by '.'); without it the
        only 1-D tensor of the right size is used (preferring one named '...mean', the CMA-ES mean
        the reference evaluates with).
        """
        from namm.memory.checkpoint import read_reference_vector

        config = config or NAMMConfig()
        expected = build_scorer(config.scorer, config.features.feature_dim).num_params
        return cls(config, read_reference_vector(Path(path), expected, key), norm)


def lift_params(source: NAMM, target: NAMMConfig) -> torch.Tensor:
    """``source``'s parameters as a flat vector for a NAMM with ``target``'s scorer and features.

    Identical scorer and features: the parameters as they are. A linear NAMM (``mlp`` of depth 1)
    lifted to a larger ``depth_basis`` (features otherwise equal): the same weights on the blocks it
    has and zero on the new ones, so the lifted NAMM scores exactly as ``source`` on every layer
    (a depth-aware run can start where a depth-blind one stopped).
    """
    src_f, dst_f = source.config.features, target.features
    if source.config.scorer == target.scorer and src_f == dst_f:
        return source.get_flat()
    linear = source.config.scorer == target.scorer and target.scorer.kind == "mlp" and target.scorer.mlp_depth == 1
    if not (linear and replace(src_f, depth_basis=dst_f.depth_basis) == dst_f
            and max(1, src_f.depth_basis) <= max(1, dst_f.depth_basis)):
        raise ValueError("Cannot start from this NAMM: its scorer or features differ from the run's, and only a "
                         "linear NAMM (scorer mlp, mlp_depth 1) lifts into a larger features.depth_basis. Start "
                         "from a NAMM with the run's [namm] scorer and features.")
    out = NAMM(target)
    src, dst = source.scorer.blocks(), out.scorer.blocks()
    dst["w0"][: src["w0"].shape[0]] = src["w0"]
    dst["b0"][:] = src["b0"]
    return out.get_flat()


def available_pretrained() -> list[str]:
    """Names of the pretrained NAMMs shipped with the package."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def read_provenance(name_or_path: str | Path) -> dict[str, Any] | None:
    """The ``provenance.json`` of a NAMM folder or shipped name (see :mod:`namm.evolution.export`),
    or None if it has none."""
    path = resolve_pretrained(name_or_path) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); re-export the NAMM with `namm export`.") from exc


def default_pretrained(model: str | None = None) -> str | None:
    """The shipped NAMM to run on ``model``: the one evolved on it (its provenance's "model"), else
    the first shipped one (a NAMM is model-agnostic: zero-shot transfer), else None."""
    names = available_pretrained()
    if model is not None:
        for name in names:
            evolved_on = (read_provenance(name) or {}).get("model")
            if isinstance(evolved_on, str) and evolved_on.lower() == model.lower():
                return name
    return names[0] if names else None


def resolve_pretrained(name_or_path: str | Path) -> Path:
    """The folder of a NAMM given as a path or as the name of a shipped pretrained NAMM."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    shipped = PRETRAINED_DIR / str(name_or_path)
    if not path.is_absolute() and shipped.is_dir():
        return shipped
    if path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is a file, not a NAMM folder; a bare parameter vector (.pt/.safetensors/.npy) "
            "loads with NAMM.from_reference(path)."
        )
    names = ", ".join(available_pretrained()) or "none installed"
    raise FileNotFoundError(
        f"No NAMM at {str(name_or_path)!r}: not a folder, and not a pretrained name (available: {names})."
    )


__all__ = ["KEEP_MODES", "NAMM", "NAMMConfig", "PRETRAINED_DIR", "PROVENANCE_FILE", "SCHEDULE_KEYS",
           "available_pretrained", "check_keep", "default_pretrained", "read_provenance", "resolve_pretrained",
           "schedule_of"]
