"""``namm inspect``: run a prompt under a policy and write one HTML page of what the memory kept.

Example::

    namm inspect --file examples/demo_document.txt "What is the access code?" \\
        --policy h2o --keep-ratio 0.5 --out kept.html
"""

from __future__ import annotations

import argparse

from namm.commands.common import add_prompt_args, add_run_args, engine_from_args


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect", help="write an HTML page of which tokens each layer kept, with their scores",
        description="Generate under a KV-cache policy and write one self-contained HTML page: every token shaded "
                    "by the share of layers and KV heads still holding it at the end (hover: per-layer kept/evicted "
                    "and the policy's last score), a layer x position heatmap and the kept cache over time.",
    )
    add_prompt_args(p)
    p.add_argument("--out", default="namm-inspect.html", help="the HTML file to write (default namm-inspect.html)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (greedy) after the prompt")
    add_run_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from namm.inspect import trace_memory
    from namm.inspect_page import write_page
    from namm.progress import generation_progress

    prompt, policy, engine = engine_from_args(args)
    with generation_progress(engine, prompt, args.max_new_tokens, args.chat, policy, enabled=not args.quiet):
        trace = trace_memory(engine, prompt, policy, max_new_tokens=args.max_new_tokens, chat=args.chat)
    trace.meta["model"] = args.model
    path = write_page(trace, args.out, title=f"What the memory kept: {args.policy} on {args.model}")
    r = trace.report
    print(f"wrote {path}: {trace.seen} tokens read, {r.kept_fraction:.1%} kept at the end "
          f"(mean {r.mean_fraction:.1%}, peak {r.peak_fraction:.1%}), {r.evictions} eviction steps")
    return 0
