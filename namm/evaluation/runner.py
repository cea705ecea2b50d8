"""Methods x tasks x lengths x budgets on one model: one row per generated sample, appended to
``rows.jsonl`` as soon as it is scored, so an interrupted run resumes where it stopped.

A *suite* runs one row: :class:`TextTasks` generates an answer to a prompt and scores it by the
task's metric; ``rl:<task>`` tasks run :class:`namm.rl.evaluate.ControlEpisodes` (a Decision
Transformer's episode in its environment, scored by normalised return). Everything else, the
variants, the resume, ``--match-namm`` and the reports, is shared."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import mean
from typing import TYPE_CHECKING, Any, Iterator

from namm.tasks import Sample, load_task, resolve_task, score_sample
from namm.tasks.jsonl import truncate_sample

if TYPE_CHECKING:
    from namm.memory.model import NAMMConfig

log = logging.getLogger(__name__)

__all__ = ["EvalConfig", "Variant", "variants", "run_evaluation", "load_rows", "row_key", "ROWS_FILE",
           "matched_keep_ratio", "matched_setting", "NAMM_THRESHOLD", "NAMM_PER_HEAD", "TextTasks", "is_control_task"]

ROWS_FILE = "rows.jsonl"
BUDGETLESS = frozenset({"full"})  # run once, no budget
EMERGENT = frozenset({"namm"})  # run in threshold mode (its own, emergent size) and in budget mode
NAMM_THRESHOLD = "threshold"  # the setting label of the NAMM's own threshold rule
NAMM_PER_HEAD = "threshold per head"  # the same, each KV head keeping its own tokens (--namm-per-head)


CONDITION_DEFAULTS: dict[str, Any] = {"chunk_size": 128, "delay": 512, "evict_at_prefill_end": True,
                                      "evict_during_prefill": True, "chat": False}


@dataclass
class EvalConfig:
    """One evaluation run; the ``namm eval`` flags map onto these fields one to one.

    The conditions (``chunk_size``, ``delay``, ``evict_at_prefill_end``, ``evict_during_prefill``,
    ``chat``) left None are filled by :func:`resolve_conditions`: from the evaluated NAMM's
    recorded conditions when the methods include ``namm`` (every method then runs under them, so
    the comparison stays side by side), else from :data:`CONDITION_DEFAULTS`.

    ``match_namm``: also run every budgeted baseline at the NAMM's measured threshold-mode kept
    fraction (see :func:`matched_keep_ratio`); the NAMM's threshold rows run first.
    ``namm_per_head``: also run the NAMM's threshold rule per KV head (each head keeps exactly its
    own tokens scoring >= the threshold; ``NAMMPolicy(per_head=True)``), setting "threshold per head".
    ``share_prefix``: settings of one method that build the same state before their first eviction
    step (the NAMM at any keep rule, H2O at any budget, SnapKV and PyramidKV with one window, ...;
    ``MemoryPolicy.fork_key``) read each prompt's prefix once and continue it from a copy
    (:mod:`namm.prefix`); the rows are identical, each row's tokens/s counts the prefix it reused.
    ``report_only``: run nothing; write the reports from the rows already in ``rows.jsonl`` (an
    interrupted run's tables and plot; a cell shows its own n, a row missing a cell shows no mean).
    """

    model: str = "smollm2"
    tasks: list[str] = field(default_factory=lambda: ["passkey"])
    lengths: list[int] = field(default_factory=lambda: [2048])
    methods: list[str] = field(default_factory=lambda: ["full"])
    keep_ratios: list[float] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    limit: int = 5
    out: str = "eval-results"
    seed: int = 0
    split: str = "test"
    filler: str = "prose"
    chunk_size: int | None = None
    delay: int | None = None
    evict_at_prefill_end: bool | None = None
    evict_during_prefill: bool | None = None
    namm: str | None = None
    data_dir: str | None = None
    chat: bool | None = None
    dtype: str | None = None
    device: str | None = None
    match_namm: bool = False
    namm_per_head: bool = False
    report_only: bool = False
    share_prefix: bool = True

    def __post_init__(self) -> None:
        if not self.tasks or not self.methods:
            raise ValueError("Give at least one task (--tasks) and one method (--methods).")
        if self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}.")
        if any(not 0 < r <= 1 for r in self.keep_ratios):
            raise ValueError(f"keep ratios must be in (0, 1], got {self.keep_ratios}.")
        if any(b < 1 for b in self.budgets) or any(n < 1 for n in self.lengths):
            raise ValueError("budgets and lengths are positive numbers of tokens.")
        control = [t for t in self.tasks if is_control_task(t)]
        if control and (len(control) > 1 or len(self.tasks) > 1):
            raise ValueError(f"An rl: task runs its own Decision Transformer (--model): evaluate one per run, not "
                             f"{', '.join(self.tasks)}.")
        if control:
            _check_control_methods(self.methods)
        for task in self.tasks:
            if task in control:
                from namm.rl.envs import get_task

                get_task(task)  # fails fast on a typo
            elif resolve_task(task)[0] == "continuation":  # also fails fast on a typo
                raise ValueError(f"{task!r} is a likelihood objective for `namm evolve` ([[tasks]]); namm eval "
                                 "scores generated answers: choose a generation task.")
        if self.match_namm and not EMERGENT & set(self.methods):
            raise ValueError("--match-namm runs the baselines at the NAMM's measured kept fraction: add namm to "
                             "--methods (and give --namm).")
        if self.namm_per_head and not EMERGENT & set(self.methods):
            raise ValueError("--namm-per-head runs the NAMM's threshold rule per KV head: add namm to --methods.")
        budgeted = [m for m in self.methods if m not in BUDGETLESS | EMERGENT]
        if budgeted and not (self.keep_ratios or self.budgets or self.match_namm):
            raise ValueError(
                f"{', '.join(budgeted)} need a cache size: give --keep-ratios (e.g. 0.25,0.5), --budgets (tokens) "
                "or --match-namm."
            )

    @property
    def control_task(self) -> str | None:
        """The ``rl:<task>`` this run evaluates, or None for language tasks."""
        return self.tasks[0] if is_control_task(self.tasks[0]) else None


def _check_control_methods(methods: list[str]) -> None:
    """Control tasks feed embeddings: refuse up front the methods that re-read the context as token ids."""
    from namm.policies import POLICIES

    side = [m for m in methods if getattr(POLICIES.get(m), "needs_side_pass", False)]
    if side:
        raise ValueError(f"{', '.join(side)} re-read the cached context as token ids in a side pass; a Decision "
                         "Transformer is fed embeddings (returns, states, actions), so drop them for rl: tasks.")


def is_control_task(name: str) -> bool:
    """Whether ``name`` is a control task (``rl:<task>``, :mod:`namm.rl`) rather than a language one."""
    return name.startswith("rl:")


@dataclass(frozen=True)
class Variant:
    """One method at one cache setting: ``setting`` labels it in the tables."""

    method: str
    setting: str
    kwargs: dict[str, Any]
    keep_ratio: float | None = None
    budget: int | None = None


def variants(config: EvalConfig, namm: NAMMConfig | None = None, matched: float | None = None) -> list[Variant]:
    """Every (method, cache setting) the run evaluates; ``setting`` is the label in the tables.

    ``full``: once, setting "full". A baseline: "keep=r" per ``keep_ratios``, "budget=B" per
    ``budgets`` and, given ``matched`` (the ``--match-namm`` ratio, see :func:`matched_keep_ratio`),
    "keep=r (namm)". The NAMM runs in both keep modes whatever mode it was evolved in (``namm``'s
    recorded keep): "threshold" (its own rule, score >= threshold: the emergent size), with
    ``namm_per_head`` "threshold per head" (the same rule per KV head), "cap=B" per
    ``budgets`` (threshold mode, at most B tokens per layer), then "keep=r" in budget mode (each
    head's top-k NAMM scores) at its recorded keep_ratio if it was evolved in budget mode, and at
    each of ``keep_ratios``.
    """
    out = []
    for method in config.methods:
        if method in BUDGETLESS:
            out.append(Variant(method, "full", {}))
        elif method in EMERGENT:
            out += _namm_variants(method, config, namm)
        else:
            out += _sized(method, config.keep_ratios, config.budgets, {})
            if matched is not None:
                out.append(Variant(method, matched_setting(matched), {"keep_ratio": matched}, keep_ratio=matched))
    return out


def _namm_variants(method: str, config: EvalConfig, namm: NAMMConfig | None) -> list[Variant]:
    base = {"namm": config.namm} if config.namm else {}
    own = [namm.keep_ratio] if namm is not None and namm.keep == "budget" else []
    ratios = own + [r for r in config.keep_ratios if r not in own]
    out = [Variant(method, NAMM_THRESHOLD, {**base, "keep": "threshold"})]
    if config.namm_per_head:
        out.append(Variant(method, NAMM_PER_HEAD, {**base, "keep": "threshold", "per_head": True}))
    out += [Variant(method, f"cap={b}", {**base, "keep": "threshold", "max_cache": b}, budget=b) for b in config.budgets]
    return out + _sized(method, ratios, [], {**base, "keep": "budget"})


def _sized(method: str, ratios: list[float], budgets: list[int], base: dict[str, Any]) -> list[Variant]:
    out = [Variant(method, f"keep={r:g}", {**base, "keep_ratio": r}, keep_ratio=r) for r in ratios]
    return out + [Variant(method, f"budget={b}", {**base, "budget": b}, budget=b) for b in budgets]


def matched_setting(ratio: float) -> str:
    """The label of a baseline run at the NAMM's measured kept fraction (``--match-namm``)."""
    return f"keep={ratio:g} (namm)"


def matched_keep_ratio(namm_rows: list[dict[str, Any]]) -> float:
    """The ``--match-namm`` keep ratio: the mean over the NAMM's threshold rows (every sample of
    every task and length) of their final kept fraction (the report's ``kept_fraction``, the
    "final cache" column), rounded to 3 decimals and at least 0.001."""
    if not namm_rows:
        raise ValueError("--match-namm needs the NAMM's threshold rows; none were run.")
    return max(round(mean(r["kept_fraction"] for r in namm_rows), 3), 0.001)


def resolve_conditions(config: EvalConfig, tokenizer=None) -> tuple[EvalConfig, NAMMConfig | None]:
    """``config`` with every condition set, and the evaluated NAMM's config (None without one).

    Without ``--namm`` the shipped pretrained NAMM for ``config.model`` is evaluated (else the first
    shipped one, zero-shot), if any. A condition given
    explicitly wins; else the NAMM's recorded value (a NAMM that records no chat choice gets the
    tokenizer's template if it has one, as :meth:`namm.engine.Engine.generate` does); else the
    default.
    """
    from namm.memory.model import default_pretrained
    from namm.policies.namm import load_namm

    namm = None
    if any(m in EMERGENT for m in config.methods):
        if config.namm is None:
            config = replace(config, namm=default_pretrained(config.model))
        if config.namm is not None:
            namm = load_namm(config.namm).config
    recorded: dict[str, Any] = {}
    if namm is not None:
        auto_chat = bool(getattr(tokenizer, "chat_template", None))
        recorded = {**namm.schedule, "chat": auto_chat if namm.chat is None else namm.chat}
    filled = {}
    for key, default in CONDITION_DEFAULTS.items():
        given = getattr(config, key)
        filled[key] = given if given is not None else recorded.get(key, default)
    return replace(config, **filled), namm


def row_key(method: str, setting: str, task: str, length: int | None, sample_id: str) -> str:
    return json.dumps([method, setting, task, length, sample_id])


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Finished rows; a last line cut short by an interrupted run is dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("skipping an unreadable line in %s (interrupted write?)", path)
    return rows


def _task_lengths(config: EvalConfig, task: str) -> list[int | None]:
    return list(config.lengths) if resolve_task(task)[0] == "synthetic" else (list(config.lengths) or [None])


def _samples(config: EvalConfig, task: str, length: int | None, tokenizer, window: int | None) -> list[Sample]:
    if resolve_task(task)[0] == "synthetic":
        return load_task(task, tokenizer, length=length, n=config.limit, seed=config.seed,
                         split=config.split, filler=config.filler)
    samples = load_task(task, tokenizer, n=config.limit, data_dir=config.data_dir)
    out = []
    for sample in samples:  # LongBench's budget: the window minus the generation length
        budgets = [b for b in (length, window - sample.max_new_tokens if window else None) if b]
        out.append(truncate_sample(sample, tokenizer, min(budgets)) if budgets else sample)
        out[-1].length = length
    return out


def _work(config: EvalConfig, tokenizer, window: int | None) -> Iterator[tuple[str, int | None, Sample]]:
    for task in config.tasks:
        for length in _task_lengths(config, task):
            for sample in _samples(config, task, length, tokenizer, window):
                yield task, length, sample


def _row(variant: Variant, task: str, length: int | None, sample: Sample, out) -> dict[str, Any]:
    return make_row(variant, task, length, sample.id, {
        "score": score_sample(sample, out.text), "metric": sample.metric, "prediction": out.text,
        "answers": sample.answers, "prompt_tokens": out.prompt_tokens, "new_tokens": len(out.token_ids),
    }, out.report, {"tokens_per_s": out.timings.get("tokens_per_s"), "total_s": out.timings.get("total_s"),
                    "prefix_reused_s": out.timings.get("prefix_reused_s", 0.0)})


def make_row(variant: Variant, task: str, length: int | None, sample_id: str, result: dict[str, Any], report,
             timings: dict[str, Any]) -> dict[str, Any]:
    """One ``rows.jsonl`` row: which variant and sample, the suite's ``result`` (``score`` at least),
    the memory the engine measured (a :class:`~namm.report.MemoryReport`) and ``timings``."""
    return {
        "method": variant.method, "setting": variant.setting, "task": task, "length": length,
        "sample_id": sample_id, "keep_ratio": variant.keep_ratio, "budget": variant.budget, **result,
        "kept_fraction": report.kept_fraction, "mean_fraction": report.mean_fraction,
        "peak_fraction": report.peak_fraction, "kv_bytes": report.kv_bytes,
        "kv_bytes_full": report.kv_bytes_full, "peak_kv_bytes": report.peak_kv_bytes, **timings,
    }


def run_evaluation(config: EvalConfig, model=None, tokenizer=None, progress: bool = True) -> list[dict[str, Any]]:
    """Run every missing row, append each to ``<out>/rows.jsonl``, write the reports; return all
    rows of this configuration (finished earlier or now).

    ``model`` / ``tokenizer``: the language model, or for an ``rl:`` task the
    :class:`~namm.rl.model.DecisionTransformer` (no tokenizer); loaded from ``config.model`` if None.
    With ``match_namm`` the NAMM's threshold rows run first; the matched keep ratio comes from
    them (finished or new), so a rerun finds the same ratio and skips the finished matched rows.
    """
    from namm.engine import EngineConfig
    from namm.evaluation.report import write_reports
    from namm.policies import make_policy

    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.control_task is not None:
        from namm.rl.evaluate import ControlEpisodes as Suite
    else:
        Suite = TextTasks
    if model is None:
        config, model, tokenizer = Suite.load(config)
    config, namm = resolve_conditions(config, tokenizer)
    if not (config.report_only and (out_dir / "config.json").exists()):  # the config that produced the rows
        (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2), encoding="utf-8")
    suite = Suite(config, model, tokenizer, EngineConfig(
        chunk_size=config.chunk_size, delay=config.delay, evict_at_prefill_end=config.evict_at_prefill_end,
        evict_during_prefill=config.evict_during_prefill))
    # build each policy once up front so a bad setting fails before any work (1.0 stands in for
    # the matched ratio, measured later)
    for v in variants(config, namm, 1.0 if config.match_namm else None):
        make_policy(v.method, **v.kwargs)
    rows_path = out_dir / ROWS_FILE
    done = {row_key(r["method"], r["setting"], r["task"], r["length"], r["sample_id"]): r for r in load_rows(rows_path)}
    work = suite.work()
    notes = _label_notes(config) + suite.notes()
    matched = None
    with rows_path.open("a", encoding="utf-8") as handle:
        if config.match_namm:
            threshold = [v for v in variants(config, namm) if v.method in EMERGENT and v.setting == NAMM_THRESHOLD]
            if not config.report_only:
                _run_missing(suite, threshold, work, done, handle, progress)
            keys = [row_key(v.method, v.setting, t, ln, s.id) for v in threshold for t, ln, s in work]
            namm_rows = [done[k] for k in keys if k in done]
            if not namm_rows:
                raise ValueError(f"--match-namm --report-only: {rows_path} has no NAMM threshold rows of this "
                                 "configuration to measure the kept fraction on; run without --report-only first.")
            matched = matched_keep_ratio(namm_rows)
            log.info("--match-namm: the NAMM kept %.4f of the tokens seen (final, mean of %d rows) -> keep ratio %g",
                     mean(r["kept_fraction"] for r in namm_rows), len(namm_rows), matched)
            notes.append(f"{matched_setting(matched)}: the baseline at the NAMM's measured kept fraction, the mean final "
                         f"kept fraction of its {NAMM_THRESHOLD} rows over all {len(namm_rows)} samples, rounded to "
                         "3 decimals.")
        plan = variants(config, namm, matched)
        if not config.report_only:
            _run_missing(suite, plan, work, done, handle, progress)
    wanted = {row_key(v.method, v.setting, t, ln, s.id) for v in plan for t, ln, s in work}
    rows = [r for k, r in done.items() if k in wanted]
    evolved = f"; the NAMM was evolved with {make_policy('namm', namm=config.namm).describe_keep()}" if namm else ""
    write_reports(rows, out_dir, title=f"namm eval: {config.model}",
                  conditions=suite.conditions(f"per setting{evolved}"), notes=notes)
    return rows


class TextTasks:
    """Language tasks: each sample's prompt generated under the policy, scored by the task's metric.

    A suite (see the module docstring) knows how to load its model (``load``), list the work
    (``work``: (task, length, sample) with ``sample.id``), run one row (``run``) and describe the
    conditions every method ran under (``conditions``) and its rows (``notes``).
    """

    unit = "gen"

    def __init__(self, config: EvalConfig, model, tokenizer, engine_config) -> None:
        from namm.engine import Engine
        from namm.prefix import PrefixStore

        self.config, self.tokenizer = config, tokenizer
        # one prefix at a time: _run_missing runs the variants that share it one after another
        store = PrefixStore(max_entries=1) if config.share_prefix else None
        self.engine = Engine(model, tokenizer, config=engine_config, prefix_store=store)

    @staticmethod
    def load(config: EvalConfig) -> tuple[EvalConfig, Any, Any]:
        from namm.models import load_model

        model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
        return config, model, tokenizer

    def work(self) -> list[tuple[str, int | None, Sample]]:
        return list(_work(self.config, self.tokenizer, self.engine.max_length()))

    def run(self, variant: Variant, task: str, length: int | None, sample: Sample, policy) -> dict[str, Any]:
        chat = self.config.chat and not sample.meta.get("no_chat", False)
        out = self.engine.generate(sample.prompt, max_new_tokens=sample.max_new_tokens, stop=sample.stop,
                                   chat=chat, policy=policy)
        return _row(variant, task, length, sample, out)

    def conditions(self, keep: str) -> str:
        from namm.engine import format_conditions

        return format_conditions({**self.engine.conditions(chat=self.config.chat), "keep": keep})

    def notes(self) -> list[str]:
        return []


def _label_notes(config: EvalConfig) -> list[str]:
    if not EMERGENT & set(config.methods):
        return []
    return [f"namm {NAMM_THRESHOLD}: the NAMM's own rule (keep the tokens scoring >= its threshold: an emergent "
            "cache size); cap=B: the same, at most B tokens per layer; keep=r: budget mode, each KV head keeps "
            "its top ceil(r x tokens seen) NAMM scores."]


def _run_missing(suite, plan: list[Variant], work: list[tuple[str, int | None, Any]],
                 done: dict[str, dict[str, Any]], handle, progress: bool) -> None:
    """Run and score every (variant, sample) of ``plan`` x ``work`` not in ``done`` with ``suite``;
    append each row to ``handle`` as it finishes and add it to ``done``."""
    from namm.policies import make_policy

    plan = by_fork_key(plan)
    todo = [(v, w) for w in work for v in plan if row_key(v.method, v.setting, w[0], w[1], w[2].id) not in done]
    total = len(work) * len(plan)
    log.info("%d rows planned, %d already done, %d to run", total, total - len(todo), len(todo))
    bar = _progress(len(todo), progress, suite.unit)
    for variant, (task, length, sample) in todo:
        row = suite.run(variant, task, length, sample, make_policy(variant.method, **variant.kwargs))
        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()
        done[row_key(variant.method, variant.setting, task, length, sample.id)] = row
        bar.set_postfix_str(f"{variant.method} {variant.setting} {task}")
        bar.update(1)
    bar.close()


def by_fork_key(plan: list[Variant]) -> list[Variant]:
    """``plan`` with the variants that can share a prompt's prefix (equal ``fork_key``) next to each
    other, groups in order of first appearance: each sample runs one group after another, so a
    prefix store of one entry serves every variant of a group."""
    from namm.policies import make_policy

    groups: dict[Any, int] = {}
    order = []
    for i, v in enumerate(plan):
        key = make_policy(v.method, **v.kwargs).fork_key()
        order.append((groups.setdefault(("shared", key) if key is not None else ("own", i), len(groups)), i))
    return [plan[i] for _, i in sorted(order)]


def _progress(total: int, enabled: bool, unit: str = "gen"):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit=unit, desc="namm eval", dynamic_ncols=True)
