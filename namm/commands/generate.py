"""``namm generate``: answer a prompt under a memory policy and report the cache it kept."""

from __future__ import annotations

import argparse
import json
import sys

from namm.commands.common import add_prompt_args, add_run_args, engine_from_args
from namm.engine import format_conditions
from namm.policies.namm import NAMMPolicy
from namm.progress import generation_progress


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate under a memory policy and print a memory report",
                       description="Read a prompt (argument, --file, or stdin) and generate under a KV-cache policy.")
    add_prompt_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_run_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prompt, policy, engine = engine_from_args(args)
    with generation_progress(engine, prompt, args.max_new_tokens, args.chat, policy, enabled=not args.quiet):
        out = engine.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                              temperature=args.temperature, top_p=args.top_p, stop=args.stop, chat=args.chat,
                              seed=args.seed)
    r = out.report
    conditions = engine.conditions(policy, args.chat)  # what ran: a NAMM's recorded conditions unless overridden
    namm = namm_description(policy, args.model)
    if args.json:
        json.dump({"text": out.text, "policy": args.policy, "namm": namm, "model": args.model,
                   "prompt_tokens": out.prompt_tokens, "new_tokens": len(out.token_ids),
                   "finish_reason": out.finish_reason, "conditions": conditions, "memory": r.to_dict(),
                   "timings": out.timings}, sys.stdout, indent=2)
        print()
        return 0
    print(out.text.strip())
    print()
    print(f"--- memory ({args.policy}) ---")
    if namm:
        print(f"namm             {namm}")
    print(f"conditions       {format_conditions(conditions)}")
    kept_tokens = sum(r.final_len) / max(len(r.final_len), 1)
    print(f"tokens seen      {r.tokens_seen} ({out.prompt_tokens} prompt + {len(out.token_ids)} generated)")
    print(f"tokens kept      {kept_tokens:.0f} per layer = {r.kept_fraction:.1%} at the end "
          f"(mean {r.mean_fraction:.1%}, peak {r.peak_fraction:.1%}); {r.evictions} eviction steps")
    print(f"  prefill        {r.prefill.summary()}")
    print(f"  decode         {r.decode.summary()}")
    print(f"KV cache         {r.kv_bytes / 2**20:.2f} MiB kept vs {r.kv_bytes_full / 2**20:.2f} MiB full "
          f"({r.kv_bytes / max(r.kv_bytes_full, 1):.1%}); peak {r.peak_kv_bytes / 2**20:.2f} MiB "
          f"({r.peak_kv_bytes / max(r.kv_bytes_full, 1):.1%} of full)")
    t = out.timings
    print(f"time             {t['total_s']:.1f} s (prefill {t['prefill_s']:.1f} s, decode {t['decode_s']:.1f} s, "
          f"{t['tokens_per_s']:.0f} tokens/s)")
    return 0


def namm_description(policy, model: str) -> str | None:
    """Which NAMM ran (its name or path), noting a zero-shot run on another model; None for other policies."""
    if not isinstance(policy, NAMMPolicy):
        return None
    text = policy.source or "a NAMM object"
    evolved_on = policy.namm.config.evolved_on
    if evolved_on and evolved_on.lower() != str(model).lower():
        text += f" (evolved on {evolved_on}, zero-shot)"
    return text
