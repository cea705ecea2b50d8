"""The shipped NAMM's training curve over its whole ``init`` chain, one PNG.

Follows ``init`` from a run folder back to the first run (:func:`namm.evolution.plot.chain_history`)
and plots the population mean and the CMA mean's evaluations against the generation counted over
the chain, with the hand-designed methods' fitness on the last task set as horizontal lines.

    python benchmarks/training_curve.py --run training/smollm2-linear-depth --ship-generation 34 \
        --baseline H2O=0.383 --baseline TOVA=0.383 --out docs/results/training-curve.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from namm.evolution.plot import chain_history, plot_chain


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="the last run folder of the chain")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--baseline", action="append", default=[], metavar="NAME=FITNESS",
                   help="a horizontal line: a method's fitness on the last run's eval prompts (repeatable)")
    p.add_argument("--ship-generation", type=int, default=None,
                   help="the last run's generation that was shipped (a red line)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    baselines = {}
    for item in args.baseline:
        name, sep, value = item.partition("=")
        if not sep:
            p.error(f"--baseline takes NAME=FITNESS, got {item!r}")
        baselines[name] = float(value)
    rows = chain_history(args.run)
    marker = None
    if args.ship_generation is not None:
        marker = next((r["step"] for r in rows if r["run"] == args.run.rstrip("/") and r["generation"] == args.ship_generation),
                      None)
        if marker is None:
            p.error(f"generation {args.ship_generation} is not in {args.run}'s log")
    runs = list(dict.fromkeys(r["run"] for r in rows))
    title = args.title or "training curve: " + " -> ".join(Path(r).name for r in runs)
    plot_chain(rows, args.out, title=title, baselines=baselines,
               marker=marker)
    for run in runs:
        seg = [r for r in rows if r["run"] == run]
        print(f"{run}: generations {seg[0]['generation']}-{seg[-1]['generation']} (steps {seg[0]['step']}-{seg[-1]['step']}), "
              f"{sum(r['seconds'] or 0 for r in seg) / 3600:.2f} h")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
