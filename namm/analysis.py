"""What a memory policy evicts: kept fractions by token kind, layer and age once a prompt is read.

:func:`eviction_stats` reads prompts under a policy with :func:`namm.inspect.trace_memory` (one
token generated, so the cache is the one the prompt left, prompt-end eviction included) and tallies,
for every prompt token and managed layer, the fraction of KV heads still holding it. Tokens are
grouped by kind (:data:`KINDS`, from each token's decoded piece) and by age (tokens between it and the
end of the prompt, bucketed at ``age_edges``). :class:`EvictionStats` holds the sums and gives the
tables, :func:`comparison_markdown` and :func:`plot_comparison` put several policies side by side.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from namm.engine import Engine
from namm.inspect import token_pieces, trace_memory
from namm.policies.base import MemoryPolicy

__all__ = ["AGE_EDGES", "KINDS", "EvictionStats", "comparison_markdown", "eviction_stats", "input_names",
           "linear_readout", "linear_readout_markdown", "piece_kind", "plot_comparison", "template_mask",
           "token_kinds"]

log = logging.getLogger(__name__)

# special: the tokenizer's special / added tokens (BOS, <|im_start|>, ...); template: the other
# tokens the chat template wraps around the prompt (role names, a default system prompt)
KINDS = ("special", "template", "newline", "whitespace", "punctuation", "digits", "word", "other")
AGE_EDGES = (64, 256, 512)
_MARKERS = str.maketrans({"Ġ": " ", "▁": " ", "Ċ": "\n", "ĉ": "\t"})  # byte-level BPE / SentencePiece


# -- token kinds ----------------------------------------------------------------------------------


def piece_kind(piece: str) -> str:
    """The kind of a token's text (a decoded piece, or a raw one: 'Ġ'/'▁' read as a space, 'Ċ' as a
    newline): newline, whitespace, digits, punctuation (symbols too), word (letters, maybe digits)
    or other (mixed, or a partial UTF-8 byte)."""
    text = piece.translate(_MARKERS)
    core = text.strip()
    if not core:
        return "newline" if "\n" in text else "whitespace"
    if "\ufffd" in core:  # a piece of a multi-byte character
        return "other"
    if core.isdigit():
        return "digits"
    if all(unicodedata.category(ch)[0] in "PS" for ch in core):
        return "punctuation"
    if core.isalnum() and any(ch.isalpha() for ch in core):
        return "word"
    return "other"


def special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens and of added tokens marked special (chat markers)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return ids | {i for i, token in added.items() if getattr(token, "special", False)}


def template_mask(tokenizer, content: str, ids: Sequence[int]) -> np.ndarray:
    """(len(ids),) bool: the tokens of a chat-formatted prompt outside the user's ``content``.

    Renders the template as :meth:`namm.engine.Engine.encode` does and finds ``content`` in it by
    character offsets; all False (with a warning) when the rendering does not give ``ids``.
    """
    none = np.zeros(len(ids), dtype=bool)
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    start = text.find(content)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if start < 0 or list(enc["input_ids"]) != list(ids):
        log.warning("could not locate the prompt inside its chat template; template tokens count as content")
        return none
    offsets = np.asarray(enc["offset_mapping"]).reshape(-1, 2)
    return (offsets[:, 1] <= start) | (offsets[:, 0] >= start + len(content))


def token_kinds(tokenizer, ids: Sequence[int], template: np.ndarray | None = None) -> list[str]:
    """The kind (one of :data:`KINDS`) of every token: special ids first, then ``template`` (a bool
    mask, e.g. :func:`template_mask`), then :func:`piece_kind` of its decoded piece (the raw piece
    where the decoded one is empty, as SentencePiece decodes a lone '▁')."""
    specials = special_ids(tokenizer) if tokenizer is not None else set()
    pieces = token_pieces(tokenizer, list(ids))
    raw = tokenizer.convert_ids_to_tokens(list(ids)) if tokenizer is not None else pieces
    kinds = []
    for i, (token_id, piece) in enumerate(zip(ids, pieces)):
        if token_id in specials:
            kinds.append("special")
        elif template is not None and template[i]:
            kinds.append("template")
        else:
            kinds.append(piece_kind(piece or raw[i] or ""))
    return kinds


def age_labels(edges: Sequence[int]) -> list[str]:
    """"0-63", "64-255", ..., "512+" for edges (64, 256, 512)."""
    bounds = [0, *edges]
    return [f"{lo}-{hi - 1}" for lo, hi in zip(bounds, bounds[1:])] + [f"{bounds[-1]}+"]


# -- statistics -----------------------------------------------------------------------------------


@dataclass
class EvictionStats:
    """Tokens kept once prompts were read, summed by kind, managed layer and age bucket.

    kept:  (kinds, layers, ages) float: sum over tokens of the fraction of KV heads holding them.
    count: (kinds, ages) int: tokens (each counts once per layer in ``kept``).
    Fractions are NaN where a group has no tokens.
    """

    label: str
    layers: list[int]
    age_edges: tuple[int, ...] = AGE_EDGES
    kept: np.ndarray | None = None
    count: np.ndarray | None = None
    n_prompts: int = 0
    conditions: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        edges = tuple(int(e) for e in self.age_edges)
        if not edges or edges[0] <= 0 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"age_edges must be increasing positive token counts, got {self.age_edges!r}.")
        self.age_edges = edges
        shape = (len(KINDS), len(self.layers), len(edges) + 1)
        self.kept = np.zeros(shape) if self.kept is None else np.asarray(self.kept, dtype=float)
        self.count = np.zeros((shape[0], shape[2]), dtype=np.int64) if self.count is None else np.asarray(self.count)

    @property
    def ages(self) -> list[str]:
        return age_labels(self.age_edges)

    @property
    def tokens(self) -> int:
        return int(self.count.sum())

    def add(self, held: np.ndarray, kinds: Sequence[str]) -> None:
        """One prompt: ``held`` (layers, kv_heads, n) bool, token i held by that layer's head; its
        ``kinds``; ages counted back from the last token (age 0)."""
        n_layers, _, n = held.shape
        if n_layers != len(self.layers) or len(kinds) != n:
            raise ValueError(f"held {held.shape} does not match {len(self.layers)} layers and {len(kinds)} tokens.")
        share = held.mean(axis=1)  # (layers, n) fraction of KV heads holding each token
        bucket = np.searchsorted(self.age_edges, n - 1 - np.arange(n), side="right")
        cell = np.array([KINDS.index(k) for k in kinds], dtype=np.int64) * (len(self.age_edges) + 1) + bucket
        shape = self.count.shape
        for i in range(n_layers):
            self.kept[:, i, :] += np.bincount(cell, weights=share[i], minlength=self.count.size).reshape(shape)
        self.count += np.bincount(cell, minlength=self.count.size).reshape(shape)
        self.n_prompts += 1

    @staticmethod
    def _ratio(kept: np.ndarray, count: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, kept / np.maximum(count, 1), np.nan)

    def overall(self) -> float:
        """Kept fraction of all prompt tokens, mean over layers and KV heads."""
        return float(self._ratio(self.kept.sum(), self.count.sum() * len(self.layers)))

    def by_kind(self) -> dict[str, tuple[float, float]]:
        """kind -> (share of all tokens, kept fraction), every kind."""
        counts = self.count.sum(axis=1)
        kept = self._ratio(self.kept.sum(axis=(1, 2)), counts * len(self.layers))
        shares = counts / max(self.tokens, 1)
        return {k: (float(shares[i]), float(kept[i])) for i, k in enumerate(KINDS)}

    def by_age(self) -> dict[str, tuple[float, float]]:
        """age bucket -> (share of all tokens, kept fraction)."""
        counts = self.count.sum(axis=0)
        kept = self._ratio(self.kept.sum(axis=(0, 1)), counts * len(self.layers))
        shares = counts / max(self.tokens, 1)
        return {a: (float(shares[i]), float(kept[i])) for i, a in enumerate(self.ages)}

    def by_layer(self) -> np.ndarray:
        """(layers,) kept fraction of each managed layer."""
        return self._ratio(self.kept.sum(axis=(0, 2)), np.full(len(self.layers), self.tokens))

    def kind_by_layer(self) -> np.ndarray:
        """(kinds, layers) kept fraction of each kind in each layer."""
        return self._ratio(self.kept.sum(axis=2), self.count.sum(axis=1)[:, None])

    def to_dict(self) -> dict[str, Any]:
        """Tables and raw sums, JSON-ready (NaN as None)."""
        def num(x: float) -> float | None:
            return None if np.isnan(x) else round(float(x), 6)

        return {
            "label": self.label, "conditions": self.conditions, "n_prompts": self.n_prompts, "tokens": self.tokens,
            "layers": self.layers, "kinds": list(KINDS), "ages": self.ages, "age_edges": list(self.age_edges),
            "overall": num(self.overall()),
            "by_kind": {k: {"share": num(s), "kept": num(f)} for k, (s, f) in self.by_kind().items()},
            "by_age": {a: {"share": num(s), "kept": num(f)} for a, (s, f) in self.by_age().items()},
            "by_layer": [num(x) for x in self.by_layer()],
            "kind_by_layer": {k: [num(x) for x in row] for k, row in zip(KINDS, self.kind_by_layer())},
            "kept_sum": self.kept.round(6).tolist(), "count": self.count.tolist(),
        }

    def to_markdown(self) -> str:
        return comparison_markdown([self])

    def plot(self, path: str | Path) -> Path:
        return plot_comparison([self], path, title=self.label)


def eviction_stats(engine: Engine, prompts: Sequence, policy: MemoryPolicy | None = None, *,
                   chat: bool | None | Sequence[bool | None] = None, label: str | None = None,
                   age_edges: Sequence[int] = AGE_EDGES, progress: bool = False) -> EvictionStats:
    """Read each prompt (text or ids) under ``policy`` (default: the engine's) on the engine's
    schedule and tally what every managed layer still holds when the prompt is read.

    ``chat``: one choice for all prompts or one per prompt (None: the policy's recorded choice, else
    the tokenizer's template if it has one, as :meth:`~namm.engine.Engine.generate`).
    """
    from tqdm.auto import tqdm

    if not len(prompts):
        raise ValueError("Give at least one prompt.")
    chats = list(chat) if isinstance(chat, Sequence) else [chat] * len(prompts)
    if len(chats) != len(prompts):
        raise ValueError(f"{len(chats)} chat choices for {len(prompts)} prompts.")
    policy = policy or engine.policy
    stats = None
    for prompt, use_chat in tqdm(list(zip(prompts, chats)), desc=label or "prompts", disable=not progress,
                                 unit="prompt", dynamic_ncols=True):
        trace = trace_memory(engine, prompt, policy, max_new_tokens=1, chat=use_chat)
        ids = trace.token_ids[: trace.n_prompt]
        chatted = isinstance(prompt, str) and trace.meta["conditions"]["chat"]
        template = template_mask(engine.tokenizer, prompt, ids) if chatted else None
        if stats is None:
            stats = EvictionStats(label or trace.meta["policy"], trace.layers, tuple(age_edges),
                                  conditions=trace.meta["conditions"])
        stats.add(trace.held[..., : trace.n_prompt], token_kinds(engine.tokenizer, ids, template))
    return stats


# -- reports --------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return "–" if np.isnan(x) else f"{100 * x:.1f}%"


def _kept_cell(kept: float, overall: float) -> str:
    """"41.0% (1.6x)": the kept fraction and its ratio to the policy's overall kept fraction."""
    if np.isnan(kept):
        return "–"
    return f"{_pct(kept)} ({kept / overall:.2f}x)" if overall > 0 else _pct(kept)


def _group_table(stats: list[EvictionStats], name: str, groups: str) -> list[str]:
    """Rows (kinds or age buckets) with tokens in any run: share of tokens, then each run's kept cell."""
    tables = [getattr(s, groups)() for s in stats]
    lines = [f"| {name} | share of tokens | " + " | ".join(s.label for s in stats) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in stats) + " |"]
    for key in tables[0]:
        if all(t[key][0] == 0 for t in tables):
            continue
        cells = [_kept_cell(t[key][1], s.overall()) for s, t in zip(stats, tables)]
        lines.append(f"| {key} | {_pct(tables[0][key][0])} | " + " | ".join(cells) + " |")
    lines.append("| all | 100.0% | " + " | ".join(_pct(s.overall()) for s in stats) + " |")
    return lines


def comparison_markdown(stats: list[EvictionStats], header: str = "") -> str:
    """Tables by kind, by age and by layer with one column per run, then kind x layer per run."""
    first = stats[0]
    out = [header] if header else []
    out += ["## Kept by token kind", "",
            "Kept fraction of the prompt tokens of each kind once the prompt is read (mean over managed layers "
            "and KV heads); in brackets its ratio to the run's overall kept fraction (>1: kept more often than "
            "the average token).", "", *_group_table(stats, "kind", "by_kind"), "",
            "## Kept by age", "", "Age: tokens between a token and the end of the prompt (0 = the last one).", "",
            *_group_table(stats, "age (tokens)", "by_age"), "",
            "## Kept by layer", "",
            "| layer | " + " | ".join(s.label for s in stats) + " |",
            "| ---: | " + " | ".join("---:" for _ in stats) + " |"]
    per_layer = [s.by_layer() for s in stats]
    out += [f"| {layer} | " + " | ".join(_pct(p[i]) for p in per_layer) + " |" for i, layer in enumerate(first.layers)]
    present = [i for i, k in enumerate(KINDS) if first.count[i].sum() > 0]
    for s in stats:
        grid = s.kind_by_layer()
        out += ["", f"<details><summary>Kind x layer: {s.label}</summary>", "",
                "| layer | " + " | ".join(KINDS[i] for i in present) + " |",
                "| ---: | " + " | ".join("---:" for _ in present) + " |"]
        out += [f"| {layer} | " + " | ".join(_pct(grid[i, j]) for i in present) + " |"
                for j, layer in enumerate(s.layers)]
        out += ["", "</details>"]
    return "\n".join(out) + "\n"


def plot_comparison(stats: list[EvictionStats], path: str | Path, title: str = "") -> Path:
    """Top row: kept fraction by kind and by age (grouped bars, one colour per run) and by layer
    (lines); bottom row: each run's kind x layer kept fraction as a heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = stats[0]
    kinds = [k for i, k in enumerate(KINDS) if first.count[i].sum() > 0]
    fig = plt.figure(figsize=(max(13, 3.2 * len(stats)), 8.5), dpi=110)
    rows = fig.add_gridspec(2, 1, height_ratios=[1, 1.1], hspace=0.45)
    _plot_profiles(rows[0].subgridspec(1, 3, wspace=0.3, width_ratios=[1.6, 1, 1.2]).subplots(), stats, kinds)
    _plot_heatmaps(fig, np.atleast_1d(rows[1].subgridspec(1, len(stats), wspace=0.15).subplots()), stats, kinds)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _plot_profiles(axes, stats: list[EvictionStats], kinds: list[str]) -> None:
    """Kept fraction by kind and by age (bars; tick labels give the share of tokens) and by layer."""
    from matplotlib.ticker import MaxNLocator

    ax_kind, ax_age, ax_layer = axes
    first, width = stats[0], 0.8 / len(stats)
    ages = [a for a, (share, _) in first.by_age().items() if share > 0]
    for j, s in enumerate(stats):
        kind_table, age_table = s.by_kind(), s.by_age()
        ax_kind.bar(np.arange(len(kinds)) + j * width, [kind_table[k][1] for k in kinds], width, label=s.label)
        ax_age.bar(np.arange(len(ages)) + j * width, [age_table[a][1] for a in ages], width)
        ax_layer.plot(s.layers, s.by_layer(), marker=".")
    for ax, labels, table, name in ((ax_kind, kinds, first.by_kind(), "token kind (share of tokens)"),
                                    (ax_age, ages, first.by_age(), "age: tokens before prompt end (share)")):
        ticks = [f"{label} ({100 * table[label][0]:.0f}%)" for label in labels]
        ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, ticks, rotation=30, ha="right", fontsize=8)
        ax.set_xlabel(name)
    ax_layer.set_xlabel("layer")
    ax_layer.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("kept fraction")
        ax.grid(alpha=0.3, axis="y")
    ax_kind.legend(fontsize=7)


def _plot_heatmaps(fig, axes, stats: list[EvictionStats], kinds: list[str]) -> None:
    """One (kinds, layers) heatmap of the kept fraction per run, on one colour scale."""
    rows = [KINDS.index(k) for k in kinds]
    for ax, s in zip(axes, stats):
        image = ax.imshow(s.kind_by_layer()[rows], aspect="auto", vmin=0, vmax=1, cmap="viridis",
                          interpolation="nearest")
        ax.set_title(s.label, fontsize=9)
        ax.set_yticks(range(len(kinds)), kinds if ax is axes[0] else [], fontsize=7)
        ticks = np.unique(np.linspace(0, len(s.layers) - 1, min(len(s.layers), 8)).astype(int))
        ax.set_xticks(ticks, [str(s.layers[t]) for t in ticks], fontsize=7)
        ax.set_xlabel("layer")
    fig.colorbar(image, ax=list(axes), fraction=0.02, label="kept fraction")


# -- what a linear NAMM weighs ----------------------------------------------------------------------


def input_names(features) -> list[str]:
    """Names of the NAMM inputs z in order (:func:`namm.memory.features.token_features`): the age
    embedding, the spectrogram EMA bins, then the extras. ``features``: a FeatureConfig."""
    half = features.recency_dim // 2
    ages = [f"age sin w{i}" for i in range(half)] + [f"age cos w{i}" for i in range(half)]
    bins = [f"spectrogram bin {b}" + (" (DC)" if b == 0 else "") for b in range(features.n_bins)]
    return ages + bins + list(features.extras)


def linear_readout(namm, ages: Sequence[int] = (0, 16, 64, 128, 256, 512, 768, 1024)) -> dict[str, Any]:
    """What a linear NAMM (an ``mlp`` scorer of depth 1: score = w . z + b) weighs.

    Every input but the age embedding is normalised with the frozen statistics, so its weight is
    the score change per standard deviation of that input; the age embedding enters as a curve,
    ``age_curve[r] = w_age . recency(r)``, the score a token of age r gets from its age alone.
    Budget mode keeps the top scores, so only differences matter: the bias is irrelevant there.
    A NAMM with a ``depth_basis`` has weights that vary with the layer's depth: ``weights`` and the
    age curve are then the depth average (the P_0 block), and ``weights_by_depth`` gives the
    weights at the first, middle and last layer.
    """
    import torch

    from namm.memory.features import depth_basis, recency_embedding

    cfg = namm.config
    if cfg.scorer.kind != "mlp" or cfg.scorer.mlp_depth != 1:
        raise ValueError(f"linear_readout needs a linear NAMM (scorer kind 'mlp', mlp_depth 1), got "
                         f"kind {cfg.scorer.kind!r}" + (f", depth {cfg.scorer.mlp_depth}" if cfg.scorer.kind == "mlp" else "")
                         + ".")
    blocks = namm.scorer.blocks()
    w = blocks["w0"].reshape(-1).double()
    names = input_names(cfg.features)
    k = max(1, cfg.features.depth_basis)
    if len(names) * k != w.numel():
        raise ValueError(f"the scorer has {w.numel()} input weights but the features name {len(names) * k} inputs.")
    w_blocks = w.reshape(k, len(names))
    w = w_blocks[0]
    by_depth = {}
    if k > 1:
        for label, x in (("first", -1.0), ("middle", 0.0), ("last", 1.0)):
            wx = (torch.tensor(depth_basis(x, k), dtype=torch.float64)[:, None] * w_blocks).sum(0)
            by_depth[label] = dict(zip(names[cfg.features.recency_dim:], wx[cfg.features.recency_dim:].tolist()))
    r = cfg.features.recency_dim
    positions = torch.tensor([[max(ages) - a for a in ages]], dtype=torch.long)  # newest last: age = max - p
    order = torch.argsort(positions[0])
    emb = recency_embedding(positions[:, order], r, cfg.features.recency_max_freq, dtype=torch.float64)[0]
    curve = (emb @ w[:r]).tolist() if r else [0.0] * len(ages)
    by_age = dict(zip([ages[i] for i in order.tolist()], curve))
    out = {"weights": dict(zip(names[r:], w[r:].tolist())), "age_weights": dict(zip(names[:r], w[:r].tolist())),
           "bias": float(blocks["b0"].reshape(-1)[0]), "age_curve": {int(a): by_age[a] for a in sorted(by_age)}}
    if by_depth:
        out["weights_by_depth"] = by_depth
    return out


def linear_readout_markdown(readout: dict[str, Any], top: int = 12) -> str:
    """The readout as two tables: the largest input weights, and the score from age alone."""
    weights = sorted(readout["weights"].items(), key=lambda kv: -abs(kv[1]))
    depth = readout.get("weights_by_depth", {})
    head = "| input (normalised) | weight |" + "".join(f" at the {d} layer |" for d in depth)
    lines = [head, "| --- | ---: |" + " ---: |" * len(depth)]
    lines += [f"| {name} | {value:+.3f} |" + "".join(f" {depth[d][name]:+.3f} |" for d in depth)
              for name, value in weights[:top]]
    if len(weights) > top:
        lines.append(f"| ({len(weights) - top} more, each \\|w\\| <= {abs(weights[top][1]):.3f}) | |" + " |" * len(depth))
    curve = readout["age_curve"]
    lines += ["", "| age (tokens) | " + " | ".join(str(a) for a in curve) + " |",
              "| --- | " + " | ".join("---:" for _ in curve) + " |",
              "| score from age | " + " | ".join(f"{v:+.3f}" for v in curve.values()) + " |"]
    return "\n".join(lines)
