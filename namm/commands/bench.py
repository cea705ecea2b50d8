"""``namm bench``: prefill time, decoding speed and memory of every method on one model, as ratios to
the full cache and to plain transformers, with the performance targets judged pass / miss."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from namm.bench.run import BenchConfig
from namm.commands.eval import _csv
from namm.models import DEFAULT_MODEL
from namm.policies import POLICIES


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="speed and memory of every method against the full cache and plain transformers",
        description="Read a passkey prompt at each length under plain transformers and each method; print "
                    "prefill time, decoding speed, peak KV bytes and RSS, the NAMM's time split and the targets.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="smollm2 (default), gemma3-270m, a folder, an HF id or tiny-<arch>")
    p.add_argument("--dtype", default=None, help="float32 (default) or bfloat16: a bfloat16 run also prints its "
                   "speed and keep-all error against float32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--lengths", type=_csv(int), default=[1024, 2048, 4096, 8192], help="prompt lengths in tokens")
    p.add_argument("--methods", type=_csv(str), default=list(BenchConfig.methods),
                   help=f"comma-separated: {', '.join(POLICIES)}, read (namm runs keeping everything and at --keep-ratio; "
                        "read: h2o keeping everything, the cost of reading the attention weights)")
    p.add_argument("--keep-ratio", type=float, default=0.25, help="fraction kept by the baselines and the NAMM row")
    p.add_argument("--decode-lengths", type=_csv(int), default=[4096, 8192],
                   help="lengths at which decoding speed is measured")
    p.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens decoded at the decode lengths")
    p.add_argument("--repeats", type=int, default=1, help="runs per measurement (the fastest counts)")
    p.add_argument("--namm", default=None, help="NAMM folder, shipped name or parameter file (default: the shipped "
                   "NAMM for --model, else a zero NAMM that keeps everything)")
    p.add_argument("--chunk-size", type=int, default=None, help="prefill chunk (default: the NAMM's schedule)")
    p.add_argument("--delay", type=int, default=None, help="eviction period (default: the NAMM's schedule)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="write bench.json and bench.png into this folder")
    p.add_argument("--json", action="store_true", help="print the JSON document instead of the tables")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from namm.bench import BenchConfig, run_bench
    from namm.bench.report import plot, print_report, to_json

    config = BenchConfig(model=args.model, lengths=tuple(args.lengths), methods=tuple(args.methods),
                         keep_ratio=args.keep_ratio, decode_lengths=tuple(args.decode_lengths),
                         decode_tokens=args.decode_tokens, repeats=args.repeats, dtype=args.dtype,
                         device=args.device, namm=args.namm, chunk_size=args.chunk_size, delay=args.delay)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be a positive integer, got {args.threads}.")
        import torch

        torch.set_num_threads(args.threads)
    result = run_bench(config, progress=not args.quiet)
    data = to_json(result)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(data, indent=2) + "\n")
        plot(result, out / "bench.png")
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        print()
    else:
        print_report(result)
        if args.out:
            print(f"wrote {Path(args.out) / 'bench.json'} and {Path(args.out) / 'bench.png'}")
    return 0
