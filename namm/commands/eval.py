"""``namm eval``: compare KV-cache methods on tasks, lengths and cache budgets, resumably.

The schedule and prompt format (--chunk-size, --delay, --[no-]evict-*, --[no-]chat) default to
the evaluated NAMM's recorded conditions when the methods include namm (every method runs under
them), else to chunk 128, delay 512, both eviction steps on, raw prompts (as LongBench).

Settings (the table's second column): ``full``; for namm ``threshold`` (its own rule: the
tokens scoring >= its threshold, an emergent cache size), ``cap=B`` per --budgets (the same, at
most B tokens per layer) and ``keep=r`` in budget mode (each head's top-k NAMM scores) at its
recorded keep ratio if it was evolved in budget mode and at each --keep-ratios, whatever mode it
was evolved in; for a baseline ``keep=r``, ``budget=B`` and, with --match-namm, ``keep=r (namm)``:
r = the mean final kept fraction of the NAMM's threshold rows (all samples), rounded to 3
decimals, measured first (and found again from rows.jsonl when a run resumes).

The final results (held-out test split; seed 7: the evolution trains on the train split and
evaluates its mean on seeds offset by 1,000,000, so these samples are never seen)::

    namm eval --model smollm2 --methods full,namm,h2o,snapkv,tova,streaming,pyramidkv,l2 \\
        --namm smollm2 --match-namm --keep-ratios 0.25,0.35,0.5 \\
        --tasks passkey,niah_single,niah_multikey,kv_retrieval --lengths 1024 --limit 32 --seed 7 \\
        --split test --dtype bfloat16 --out docs/results/smollm2-namm

It writes per task and mean scores ± standard error, n, and the measured final / mean / peak
cache of every method and setting (results.md, .csv, .json) and score vs cache (results.png).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from namm.commands.common import add_engine_args, add_model_args, model_from_args
from namm.evaluation import EvalConfig, run_evaluation
from namm.policies import POLICIES
from namm.rl.envs import TASKS
from namm.tasks import FILLERS, SYNTHETIC_TASKS


def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from exc

    return parse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="methods x tasks x lengths x budgets -> results table and plot",
        description="Evaluate KV-cache methods on one model. Finished rows are kept in OUT/rows.jsonl "
                    "and skipped when the same command runs again.",
    )
    p.add_argument("--tasks", type=_csv(str), default=["passkey"],
                   help=f"comma-separated: synthetic ({', '.join(SYNTHETIC_TASKS)}), longbench:<task>, "
                        "infinitebench:<task>, choubun:<task>, or .jsonl paths; or one control task rl:<task> "
                        f"({', '.join(TASKS)}: a Decision Transformer's episodes, --model its folder, default "
                        "runs/rl/<task>/dt)")
    p.add_argument("--lengths", type=_csv(int), default=[2048],
                   help="prompt lengths in tokens (synthetic tasks are generated at each; benchmark prompts "
                        "are middle-truncated to each)")
    p.add_argument("--methods", type=_csv(str), default=["full"], help=f"comma-separated: {', '.join(POLICIES)}")
    p.add_argument("--keep-ratios", type=_csv(float), default=[], help="fractions of tokens kept, e.g. 0.25,0.5")
    p.add_argument("--budgets", type=_csv(int), default=[],
                   help="tokens kept per layer; for namm, caps on its threshold-mode (emergent) cache")
    p.add_argument("--match-namm", action="store_true",
                   help="also run each budgeted baseline at the NAMM's measured kept fraction (the mean final "
                        "kept fraction of its threshold rows, rounded to 3 decimals); needs namm in --methods")
    p.add_argument("--namm-per-head", action="store_true",
                   help="also run the NAMM's threshold rule per KV head (each head keeps exactly its own tokens "
                        "scoring >= 0; setting 'threshold per head'); needs namm in --methods")
    p.add_argument("--limit", type=int, default=5, help="samples per task and length (episodes for rl: tasks)")
    p.add_argument("--out", default="eval-results", help="output folder (rows.jsonl, results.*)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic samples")
    p.add_argument("--split", choices=("train", "test"), default="test", help="synthetic split (default: held-out test)")
    p.add_argument("--filler", choices=FILLERS, default="prose", help="haystack of the synthetic tasks")
    p.add_argument("--namm", default=None, help="NAMM checkpoint folder or pretrained name (method 'namm')")
    p.add_argument("--data-dir", default=None, help="folder of <task>.jsonl files for benchmark tasks (offline)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write the tables and plot from the rows already in OUT/rows.jsonl")
    p.add_argument("--no-share-prefix", dest="share_prefix", action="store_false",
                   help="read every prompt under every setting from scratch (default: settings whose state is the "
                        "same until their first eviction step, e.g. H2O at 25%% and 50%%, read each prompt's prefix "
                        "once and continue copies; the rows are the same)")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bar")
    add_model_args(p)
    add_engine_args(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(
        model=args.model, tasks=args.tasks, lengths=args.lengths,
        methods=[m.lower().replace("_", "-") for m in args.methods],
        keep_ratios=args.keep_ratios, budgets=args.budgets, limit=args.limit, out=args.out, seed=args.seed,
        split=args.split, filler=args.filler, chunk_size=args.chunk_size, delay=args.delay,
        evict_at_prefill_end=args.evict_at_prefill_end, evict_during_prefill=args.evict_during_prefill,
        namm=args.namm, data_dir=args.data_dir, chat=args.chat, dtype=args.dtype, device=args.device,
        match_namm=args.match_namm, namm_per_head=args.namm_per_head, report_only=args.report_only,
        share_prefix=args.share_prefix,
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    for method in config.methods:
        if method not in POLICIES:
            raise ValueError(f"Unknown method {method!r}; known: {', '.join(POLICIES)}.")
    quiet = getattr(args, "quiet", False)
    # a language model with a loading bar unless --quiet; an rl: task loads its Decision Transformer itself
    model, tokenizer = (None, None) if config.control_task else model_from_args(args)
    run_evaluation(config, model, tokenizer, progress=not quiet)
    out = Path(config.out)
    print((out / "results.md").read_text(encoding="utf-8"))
    print(f"Wrote {out / 'results.csv'}, results.json, results.md, results.png and rows.jsonl in {out}.")
    return 0
