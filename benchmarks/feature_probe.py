"""Can the NAMM's features see the needle? Linear probes per layer, ROC AUC on held-out prompts.

Runs needle-retrieval prompts of the synthetic suite (train split) with the full cache under the
engine's eviction schedule and, at every eviction step (every ``delay`` tokens, before the
question arrives, and the prompt-end step, where it has been read), records for each cached token
of each recorded layer and KV head:

* the NAMM's inputs: the EMA attention spectrogram (17 bins, as the scorer sees it) and the
  sinusoidal recency embedding of the token's age;
* the attention mass received so far (what H2O ranks by);
* the extra candidate inputs of :mod:`namm.memory.extra_features` (value norm, relative key norm,
  variance / entropy / peak of the attention received).

A token is positive when it belongs to an occurrence of the answer in the context (the passkey,
the needle's number, the kv_retrieval value). Probes are fit per layer with prompts held out
(GroupKFold over prompts), and the out-of-fold scores are ranked *within each cache* (one prompt,
step, layer and KV head: what a top-k eviction compares). The table gives that within-cache ROC
AUC, averaged over caches, per layer and for one probe shared by all layers (row ``all``, as the
NAMM is shared); the JSON also has the pooled AUC over all tokens.

Columns: logistic regressions on standardised inputs, except ``mass(H2O)``, H2O's own rule unfitted
(more mass ranks higher; ``mass(fit)`` learns the sign), and, in row ``all``, gradient-boosted trees
(``GBT``), a bound on what a nonlinear scorer could read. ``spec+age`` is exactly the NAMM's 25
inputs, ``logspec`` takes log(EMA), the extra columns are one input each, ``spec+extras`` is logspec
with all five extras and ``all`` adds age. Needle depths are random, so ``age`` alone should score
about 0.5; how far it is above that is what a probe can learn from where the few sampled needles
happen to sit (more ``--prompts`` shrink it), so compare the columns without age. Negatives are
subsampled per cache (AUC is unchanged in expectation); caches without an answer token are skipped.

    python benchmarks/feature_probe.py --json probe.json    # 4 tasks x 8 prompts at 1K tokens
    python benchmarks/feature_probe.py --tasks passkey --prompts 4 --layers 0,10,20
    python benchmarks/feature_probe.py --save-rows rows.npz  # then re-probe: --load-rows rows.npz
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from namm.engine import Engine, EngineConfig
from namm.memory.extra_features import EXTRA_FEATURES, AttentionMoments, extra_features
from namm.memory.features import FeatureConfig, StreamingSpectrogram, recency_embedding
from namm.models import load_model
from namm.policies.base import CacheSpec, MemoryPolicy
from namm.tasks import load_task

RETRIEVAL_TASKS = "passkey,niah_single,niah_multikey,kv_retrieval"
PHASES = ("pre-question", "prompt-end")


# -- recording ------------------------------------------------------------------------------------


@dataclass
class Records:
    """Sampled token rows of one layer (lists of arrays, concatenated at the end)."""

    columns: dict[str, list[np.ndarray]] = field(default_factory=lambda: defaultdict(list))

    def add(self, **arrays: np.ndarray) -> None:
        for name, value in arrays.items():
            self.columns[name].append(value)

    def table(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in self.columns.items()}


class RecordingPolicy(MemoryPolicy):
    """Keeps every token; at each eviction step samples rows of per-token features of its layers.

    Before each sequence set ``labels`` (bool per absolute position), ``n_prompt``, ``prompt``
    (an id) and, once the sequence exists, ``cache`` (its DynamicCache, for the values the
    engine's hook does not hand over).
    """

    needs_attention = True
    name = "recording"

    def __init__(self, layers: list[int] | None, negatives: int, seed: int, features: FeatureConfig) -> None:
        self.layers, self.negatives, self.features = layers, negatives, features
        self.rng = np.random.default_rng(seed)
        self.records: dict[int, Records] = defaultdict(Records)
        self.labels = torch.zeros(0, dtype=torch.bool)
        self.n_prompt, self.prompt, self.cache = 0, 0, None

    def reset(self, spec: CacheSpec) -> None:
        super().reset(spec)
        self.spectrogram = StreamingSpectrogram(self.features)
        self.moments = AttentionMoments(self.features.ema_coeff)
        self.mass: dict[int, torch.Tensor] = {}
        self.positions: dict[int, torch.Tensor] = {}
        self.steps = 0

    def recorded(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def observe(self, layer, attn, keys, positions) -> None:
        if not self.recorded(layer):
            return
        self.spectrogram.observe(layer, attn)
        self.moments.observe(layer, attn)
        received = attn.sum(dim=1)  # (kv_heads, cache_len)
        old = self.mass.get(layer)
        self.mass[layer] = received if old is None else torch.nn.functional.pad(old, (0, received.shape[-1] - old.shape[-1])) + received
        self.positions[layer] = positions

    def select(self, layer: int) -> None:
        if not self.recorded(layer):
            return None
        positions = self.positions[layer]  # (kv_heads, cache_len)
        seen = int(positions[0, -1]) + 1
        phase = PHASES.index("prompt-end") if seen == self.n_prompt else PHASES.index("pre-question")
        spec = getattr(self.spectrogram, "scoring_ema", self.spectrogram.ema)(layer)  # what the scorer sees
        cache_layer = self.cache.layers[layer]
        extras = extra_features(EXTRA_FEATURES, self.moments, layer, cache_layer.keys[0], cache_layer.values[0])
        recency = recency_embedding(positions, self.features.recency_dim, self.features.recency_max_freq)
        labels = self.labels[positions.cpu()]  # (kv_heads, cache_len)
        for head in range(positions.shape[0]):
            pos_idx = torch.nonzero(labels[head]).flatten().numpy()
            if pos_idx.size == 0:
                continue  # no answer token cached yet: nothing to rank
            neg_all = torch.nonzero(~labels[head]).flatten().numpy()
            neg_idx = self.rng.choice(neg_all, size=min(self.negatives, neg_all.size), replace=False)
            idx = np.concatenate([pos_idx, neg_idx])
            n = idx.size
            self.records[layer].add(
                spec=spec[head, idx].float().cpu().numpy(), recency=recency[head, idx].cpu().numpy(),
                mass=self.mass[layer][head, idx].float().cpu().numpy(), extras=extras[head, idx].cpu().numpy(),
                label=labels[head, idx].numpy(), phase=np.full(n, phase), prompt=np.full(n, self.prompt),
                cache=np.full(n, (self.prompt * 10**6 + seen) * 16 + head), age=(seen - 1 - positions[head, idx]).cpu().numpy(),
            )
        return None


# -- labels ---------------------------------------------------------------------------------------


def answer_labels(tokenizer, sample, chat: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the prompt as the engine reads it, and a bool mask of the answer's tokens.

    Every occurrence of a reference answer inside the context is labelled (a passkey needle holds
    its key twice); the question itself is not.
    """
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}],
                                             add_generation_prompt=True, tokenize=False)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    else:
        text = sample.prompt
        enc = tokenizer(text, return_offsets_mapping=True)
    start = text.find(sample.context)
    if start < 0:
        raise RuntimeError(f"{sample.id}: the context is not verbatim in the prompt; cannot label it.")
    end = start + len(sample.context)
    spans = []
    for answer in sample.answers:
        at = text.find(answer, start)
        while 0 <= at < end:
            spans.append((at, at + len(answer)))
            at = text.find(answer, at + 1)
    if not spans:
        raise RuntimeError(f"{sample.id}: no answer occurrence found in the context.")
    labels = torch.tensor([any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]])
    return torch.tensor(enc["input_ids"]), labels


# -- probes ---------------------------------------------------------------------------------------


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U with mid-ranks for ties); NaN without both classes."""
    from scipy.stats import rankdata

    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels.astype(bool)].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def within_cache_auc(scores: np.ndarray, labels: np.ndarray, caches: np.ndarray) -> float:
    """Mean ROC AUC over caches holding both classes (how a top-k eviction ranks)."""
    order = np.argsort(caches, kind="stable")
    bounds = np.flatnonzero(np.diff(caches[order])) + 1
    aucs = [auc(scores[g], labels[g]) for g in np.split(order, bounds)]
    aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def linear_probe():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, class_weight="balanced"))


def boosted_probe():
    """A nonlinear probe (gradient-boosted trees): what a bigger scorer could read from the inputs."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=100, class_weight="balanced", random_state=0)


def out_of_fold(make, x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, max_rows: int) -> np.ndarray:
    """Held-out probe scores: each prompt scored by a probe fit without it (on at most ``max_rows``
    of the other prompts' rows, drawn at random)."""
    from sklearn.model_selection import GroupKFold

    scores = np.full(len(y), np.nan)
    rng = np.random.default_rng(0)
    for train, test in GroupKFold(n_splits=min(folds, len(np.unique(groups)))).split(x, y, groups):
        if train.size > max_rows:
            train = rng.choice(train, size=max_rows, replace=False)
        if y[train].min() == y[train].max():
            continue
        model = make().fit(x[train], y[train])
        scores[test] = model.decision_function(x[test])
    return scores


def feature_sets(t: dict[str, np.ndarray]) -> dict[str, np.ndarray | None]:
    """Name -> linear-probe inputs (None: the raw attention mass, H2O's own ranking, not fit)."""
    spec, rec, extras = t["spec"], t["recency"], t["extras"]
    log_spec = np.log(spec + 1e-8)
    sets: dict[str, np.ndarray | None] = {
        "age": rec,
        "spec": spec,
        "spec+age": np.hstack([rec, spec]),  # exactly the NAMM's 25 inputs
        "logspec+age": np.hstack([rec, log_spec]),
        "mass(H2O)": None,
        "mass(fit)": np.log(t["mass"][:, None] + 1e-12),
    }
    for i, name in enumerate(EXTRA_FEATURES):
        sets[name] = extras[:, i : i + 1]
    sets["spec+extras"] = np.hstack([log_spec, extras])
    sets["all"] = np.hstack([rec, log_spec, extras])
    return sets


BOOSTED = ("spec", "spec+age", "spec+extras", "all")  # also probed with trees in the shared row


def probe_table(table: dict[str, np.ndarray], folds: int, max_rows: int,
                boosted: bool = False) -> dict[str, dict[str, float]]:
    """Per phase and probe: within-cache and pooled held-out AUC (with ``boosted``, also
    gradient-boosted probes on the NAMM's inputs and on all inputs)."""
    out: dict[str, dict[str, float]] = {}
    for phase_id, phase in enumerate(PHASES):
        m = table["phase"] == phase_id
        t = {k: v[m] for k, v in table.items()}
        y = t["label"].astype(int)
        if m.sum() == 0 or y.min() == y.max():
            continue
        row: dict[str, float] = {"tokens": int(m.sum()), "answer_tokens": int(y.sum()),
                                 "prompts": int(len(np.unique(t["prompt"])))}
        sets = feature_sets(t)
        probes = [(name, linear_probe, x) for name, x in sets.items()]
        if boosted:
            probes += [(f"GBT {name}", boosted_probe, sets[name]) for name in BOOSTED]
        for name, make, x in probes:
            scores = np.log(t["mass"] + 1e-12) if x is None else out_of_fold(make, x, y, t["prompt"], folds, max_rows)
            ok = ~np.isnan(scores)
            row[name] = within_cache_auc(scores[ok], y[ok], t["cache"][ok])
            row[name + " (pooled)"] = auc(scores[ok], y[ok])
        out[phase] = row
    return out


def save_rows(path: str, tables: dict[int, dict[str, np.ndarray]]) -> None:
    np.savez_compressed(path, **{f"{layer}/{name}": v for layer, t in tables.items() for name, v in t.items()})


def load_rows(path: str) -> dict[int, dict[str, np.ndarray]]:
    tables: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
    with np.load(path) as data:
        for key in data.files:
            layer, name = key.split("/", 1)
            tables[int(layer)][name] = data[key]
    return dict(sorted(tables.items()))


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", default=RETRIEVAL_TASKS, help="comma-separated synthetic tasks")
    ap.add_argument("--length", type=int, default=1024, help="prompt length in tokens")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per task (train split)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--delay", type=int, default=512, help="eviction period (pre-question steps)")
    ap.add_argument("--chat", action="store_true", help="wrap prompts in the chat template (default: raw)")
    ap.add_argument("--negatives", type=int, default=128, help="filler tokens sampled per cache")
    ap.add_argument("--folds", type=int, default=4, help="GroupKFold splits over prompts")
    ap.add_argument("--max-fit-rows", type=int, default=20000, help="rows a probe is fit on, at most")
    ap.add_argument("--no-boosted", action="store_true", help="skip the gradient-boosted probes (shared row)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: on shared cores more threads than free cores stall each other)")
    ap.add_argument("--save-rows", default=None, help="save the sampled token rows (.npz) to re-probe later")
    ap.add_argument("--load-rows", default=None, help="probe rows saved by --save-rows (no model run)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def collect(args, engine: Engine, tokenizer, layers: list[int] | None) -> RecordingPolicy:
    from tqdm.auto import tqdm

    policy = RecordingPolicy(layers, args.negatives, args.seed, FeatureConfig())
    samples = [s for task in args.tasks.split(",")
               for s in load_task(task, tokenizer, length=args.length, n=args.prompts, seed=args.seed, split="train")]
    for i, sample in enumerate(tqdm(samples, desc="prompts", disable=args.quiet)):
        ids, labels = answer_labels(tokenizer, sample, args.chat)
        if not torch.equal(ids, engine.encode(sample.prompt, chat=args.chat)):
            raise RuntimeError(f"{sample.id}: labelled tokens differ from the tokens the engine reads.")
        policy.labels, policy.n_prompt, policy.prompt = labels, ids.numel(), i
        with engine.running(), torch.inference_mode():
            seq = engine.start(policy)
            policy.cache = seq.cache
            seq.feed(ids, end_of_prompt=True)
    return policy


def print_table(results: dict, layers: list) -> None:
    skip = ("tokens", "answer_tokens", "prompts")
    for phase in PHASES:
        rows = [(layer, results[layer].get(phase)) for layer in layers if results[layer].get(phase)]
        if not rows:
            continue
        cols = list(dict.fromkeys(c for _, row in rows for c in row if not c.endswith("(pooled)") and c not in skip))
        width = max(len(c) for c in cols) + 1
        first = rows[-1][1]
        print(f"\n{phase}: within-cache ROC AUC of held-out probes ({first['prompts']} prompts with an answer "
              f"token cached; {first['answer_tokens']} answer / {first['tokens']} sampled token rows, all layers)")
        print(f"{'layer':>6}" + "".join(f"{c:>{width}}" for c in cols))
        for layer, row in rows:
            cells = [f"{row[c]:>{width}.3f}" if c in row else f"{'-':>{width}}" for c in cols]
            print(f"{str(layer):>6}" + "".join(cells))


def record(args) -> dict[int, dict[str, np.ndarray]]:
    """Run the prompts and return the sampled rows per layer."""
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    config = EngineConfig(chunk_size=args.chunk_size, delay=args.delay, evict_at_prefill_end=True,
                          evict_during_prefill=True)
    engine = Engine(model, tokenizer, config=config)
    layers = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    policy = collect(args, engine, tokenizer, layers)
    return {layer: rec.table() for layer, rec in sorted(policy.records.items())}


def shared_rows(tables: dict[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """All layers' rows as one table (one probe for every layer, as the NAMM is shared)."""
    shared = {k: np.concatenate([t[k] for t in tables.values()]) for k in next(iter(tables.values()))}
    layer_of = np.concatenate([np.full(len(t["label"]), layer) for layer, t in tables.items()])
    shared["cache"] = shared["cache"] * 256 + layer_of  # a cache is per layer too
    return shared


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tables = load_rows(args.load_rows) if args.load_rows else record(args)
    if args.save_rows:
        save_rows(args.save_rows, tables)
    t1 = time.perf_counter()
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # small fits: threads only contend (and fight torch's pool)
        results: dict = {layer: probe_table(t, args.folds, args.max_fit_rows) for layer, t in tables.items()}
        results["all"] = probe_table(shared_rows(tables), args.folds, args.max_fit_rows, boosted=not args.no_boosted)
    t2 = time.perf_counter()
    source = f"rows from {args.load_rows}" if args.load_rows else (
        f"model {args.model}, tasks {args.tasks}, {args.prompts} prompts x {args.length} tokens, "
        f"delay {args.delay}, chunk {args.chunk_size}, chat {args.chat}")
    print(f"{source}; recording {t1 - t0:.0f} s, probes {t2 - t1:.0f} s")
    print_table(results, list(tables) + ["all"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": {str(k): v for k, v in results.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
