"""``namm export RUN_DIR --to DEST [--which mean|best] [--force]``: ship an evolved NAMM.

A thin wrapper over :func:`namm.evolution.export.export_run`.
"""

from __future__ import annotations

import argparse

from namm.evolution.export import WHICH

DESCRIPTION = """Copy an evolution run's NAMM (mean/: the final CMA mean, or best/: the best-evaluated
mean) to DEST with a provenance.json (model, config and its sha256, generations, stages,
evaluations, compute hours, hardware, git commit, date). Export into namm/pretrained/NAME to ship
it: `namm generate --policy namm` then runs it without --namm."""


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="ship an evolved NAMM (a run's mean/ or best/) with its provenance",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder `namm evolve` wrote")
    p.add_argument("--to", required=True, metavar="DEST", help="the NAMM folder to write, e.g. namm/pretrained/NAME")
    p.add_argument("--which", choices=WHICH, default="mean", help="mean (default): the final CMA mean; "
                   "best: the mean with the best evaluation")
    p.add_argument("--force", action="store_true", help="replace DEST if it exists and is not empty")
    p.add_argument("--fit-threshold", nargs="?", type=float, const=-1.0, default=None, metavar="RATIO",
                   help="also fit the threshold of the NAMM's threshold mode so that it keeps RATIO of a prompt "
                   "on average (default: the keep_ratio a budget-mode NAMM was evolved at), by bisection over "
                   "runs of the run's own training prompts on its model. A NAMM evolved in budget mode ranks "
                   "tokens and has no trained threshold; this gives its threshold mode a meaning.")
    p.add_argument("--fit-samples", type=int, default=4, metavar="N",
                   help="training prompts per retrieval task for --fit-threshold (default 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from namm.evolution.export import export_run
    from namm.memory.model import read_provenance

    from namm.memory import NAMM

    target = args.fit_threshold
    if target is not None and target < 0:
        source = NAMM.from_pretrained(f"{args.run_dir}/{args.which}").config
        if source.keep != "budget":
            raise ValueError("--fit-threshold without a RATIO takes the NAMM's budget-mode keep_ratio, but this "
                             "NAMM was evolved in threshold mode (its threshold is trained); give a RATIO.")
        target = source.keep_ratio
    dest = export_run(args.run_dir, args.to, which=args.which, force=args.force, fit_threshold=target,
                      fit_samples=args.fit_samples, progress=not args.quiet)
    p = read_provenance(dest) or {}
    chain = ""
    if p.get("init"):
        chain = f" after {p['init'].get('generations', '?')} of the run it started from ({p['init']['path']}); " \
                f"{p.get('total_compute_hours', 0):.2f} h in all"
    print(f"exported {args.which} of {args.run_dir} to {dest}: evolved on {p.get('model')}, "
          f"{p.get('generations')} generations, {p.get('compute_hours', 0):.2f} h{chain}")
    fit = p.get("threshold_fit")
    if fit:
        print(f"threshold mode: threshold {fit['threshold']:.4g} keeps {fit['kept']:.1%} of a prompt on "
              f"{fit['prompts']} training prompts (target {fit['target']:.1%})")
    return 0
