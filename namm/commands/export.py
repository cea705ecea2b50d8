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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from namm.evolution.export import export_run
    from namm.memory.model import read_provenance

    dest = export_run(args.run_dir, args.to, which=args.which, force=args.force)
    p = read_provenance(dest) or {}
    print(f"exported {args.which} of {args.run_dir} to {dest}: evolved on {p.get('model')}, "
          f"{p.get('generations')} generations, {p.get('compute_hours', 0):.2f} h")
    return 0
