"""What a memory policy learned to evict: kept fractions by token kind, age and layer, side by side.

Reads prompts of the given tasks under each policy (the NAMM and the baselines), on the engine
schedule and prompt format the NAMM was evolved with (:func:`namm.evaluation.runner.resolve_conditions`:
flags given win, then the NAMM's recorded conditions, then the defaults), and records which prompt
tokens every managed layer still holds once the prompt is read (:func:`namm.analysis.eviction_stats`).
Writes OUT/learned.md (tables, the command line on top), OUT/learned.json and OUT/learned.png.

Each policy runs at the settings ``namm eval --keep-ratios KEEP_RATIO`` gives it
(:func:`namm.evaluation.runner.variants`): the baselines keep ``--keep-ratio``, the NAMM runs under its
own rule and as a ranking at that ratio. The tables give each kept fraction with its ratio to the
run's overall kept fraction, so runs that keep different amounts still compare.

    python benchmarks/what_it_learned.py --namm training/smollm2-default/mean --out docs/results/what-it-learned
    python benchmarks/what_it_learned.py --policies namm,h2o,tova --tasks passkey,kv_retrieval --limit 8
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from namm.analysis import (AGE_EDGES, comparison_markdown, eviction_stats, linear_readout, linear_readout_markdown,
                           plot_comparison)
from namm.commands.common import add_engine_args, add_model_args, model_from_args
from namm.engine import Engine, EngineConfig, format_conditions
from namm.evaluation.runner import EvalConfig, resolve_conditions, variants
from namm.policies.namm import load_namm
from namm.policies import make_policy
from namm.tasks import load_task

SCHEDULE_FIELDS = ("chunk_size", "delay", "evict_at_prefill_end", "evict_during_prefill")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--policies", default="namm,h2o,snapkv,streaming", help="comma list of policies to compare")
    p.add_argument("--namm", default=None, help="NAMM folder or pretrained name (default: the first shipped one)")
    p.add_argument("--keep-ratio", type=float, default=0.25, help="fraction kept by the budget policies")
    p.add_argument("--tasks", default="passkey,niah_single", help="comma list of tasks (namm.tasks names)")
    p.add_argument("--length", type=int, default=1024, help="prompt length in tokens")
    p.add_argument("--limit", type=int, default=4, help="prompts per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", help="split of the synthetic tasks (train or test)")
    p.add_argument("--filler", default="prose", help="filler text of the synthetic tasks")
    p.add_argument("--age-edges", default=",".join(map(str, AGE_EDGES)),
                   help="age bucket edges in tokens before the prompt's end")
    p.add_argument("--out", default="what-it-learned", help="folder for learned.md, learned.json, learned.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_engine_args(p)
    return p.parse_args(argv)


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def eval_config(args: argparse.Namespace) -> EvalConfig:
    """The flags as the evaluation's configuration (its checks, condition resolution and variants)."""
    return EvalConfig(model=args.model, tasks=_list(args.tasks), lengths=[args.length],
                      methods=[m.lower() for m in _list(args.policies)], keep_ratios=[args.keep_ratio],
                      limit=args.limit, seed=args.seed, split=args.split, filler=args.filler,
                      chunk_size=args.chunk_size, delay=args.delay, evict_at_prefill_end=args.evict_at_prefill_end,
                      evict_during_prefill=args.evict_during_prefill, namm=args.namm, chat=args.chat,
                      dtype=args.dtype, device=args.device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    command = "python benchmarks/what_it_learned.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        edges = tuple(int(e) for e in _list(args.age_edges))
    except ValueError:
        raise SystemExit(f"--age-edges takes comma-separated token counts, got {args.age_edges!r}.") from None
    model, tokenizer = model_from_args(args)
    config, namm = resolve_conditions(eval_config(args), tokenizer)
    engine = Engine(model, tokenizer, config=EngineConfig(**{k: getattr(config, k) for k in SCHEDULE_FIELDS}))
    samples = [s for task in config.tasks
               for s in load_task(task, tokenizer, length=args.length, n=config.limit, seed=config.seed,
                                  split=config.split, filler=config.filler)]
    chats = [bool(config.chat) and not s.meta.get("no_chat", False) for s in samples]
    stats = []
    for v in variants(config, namm):
        label = v.method if v.setting == "full" else f"{v.method} {v.setting}"
        stats.append(eviction_stats(engine, [s.prompt for s in samples], make_policy(v.method, **v.kwargs),
                                    chat=chats, label=label, age_edges=edges, progress=not args.quiet))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    conditions = engine.conditions(chat=config.chat)
    conditions["keep"] = "per column"
    header = "\n".join([
        f"# What the memory keeps: {config.model}", "", f"`{command}`", "",
        f"Conditions: {format_conditions(conditions)}. Prompts: {len(samples)} ({', '.join(config.tasks)} at "
        f"{args.length} tokens, {config.split} split, seed {config.seed}), {stats[0].tokens} prompt tokens in all.",
        "", "Each prompt is read (one token generated), then every managed layer's cache is checked: a token "
        "counts as the fraction of that layer's KV heads still holding it.", ""])
    text = comparison_markdown(stats, header=header)
    readout = None
    if namm is not None and namm.scorer.kind == "mlp" and namm.scorer.mlp_depth == 1:
        readout = linear_readout(load_namm(config.namm))  # linear: its weights say what it scores
        text += ("\n\n## The NAMM's weights (linear: score = w . z + b)\n\nInputs normalised with the frozen "
                 "statistics, so a weight is the score per standard deviation; the age embedding as the score "
                 "a token gets from its age alone.\n\n" + linear_readout_markdown(readout) + "\n")
    (out / "learned.md").write_text(text, encoding="utf-8")
    (out / "learned.json").write_text(json.dumps({
        "command": command, "config": asdict(config), "conditions": conditions,
        "runs": [s.to_dict() for s in stats], "linear_readout": readout}, indent=1), encoding="utf-8")
    plot_comparison(stats, out / "learned.png", title=f"What the memory keeps: {config.model}")
    print(f"wrote {out / 'learned.md'}, {out / 'learned.json'}, {out / 'learned.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
