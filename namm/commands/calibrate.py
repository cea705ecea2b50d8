"""``namm calibrate``: collect and freeze a NAMM's feature normalisation for a model.

The NAMM's spectrogram features are normalised per frequency bin with statistics gathered once
from keep-all runs of the model (namm-algorithm.md section 5, "synchronised buffers"). This
command runs those keep-all prompts and writes a loadable NAMM checkpoint folder.

To carry a NAMM to another model, ``--fit-threshold RATIO`` also (or, with ``--keep-stats``, only)
refits its threshold-mode threshold on that model's training prompts, so that it keeps RATIO of a
prompt there (:func:`namm.memory.calibration.fit_threshold`); the parameters do not change (unless
``--perturb`` is given). What was done is recorded in ``calibration.json`` beside the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from namm.commands.common import add_engine_args, add_model_args, engine_config_from_args, model_from_args
from namm.engine import Engine, EngineConfig
from namm.memory import NAMM, NAMMConfig
from namm.memory.model import schedule_of
from namm.memory.calibration import calibrate, fit_threshold
from namm.policies.namm import load_namm
from namm.tasks import load_task

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="collect and freeze a NAMM's normalisation statistics",
                       description="Run keep-all prompts and store the NAMM's per-bin feature statistics.")
    p.add_argument("--out", required=True, help="folder to write the calibrated NAMM to")
    p.add_argument("--namm", default=None, help="start from this NAMM (folder, pretrained name or vector file); "
                   "default: a zero-initialised NAMM (keeps every token)")
    p.add_argument("--tasks", default="passkey,niah_multikey", help="comma-separated task names for the prompts")
    p.add_argument("--lengths", default="1024", help="comma-separated prompt lengths in tokens (synthetic tasks)")
    p.add_argument("--samples", type=int, default=4, help="prompts per task and length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perturb", type=float, default=0.0,
                   help="add N(0, PERTURB^2) noise to the parameters (e.g. 0.5 for a random NAMM that evicts)")
    p.add_argument("--fit-threshold", type=float, default=None, metavar="RATIO",
                   help="also fit the threshold of the NAMM's threshold mode so that it keeps RATIO of these "
                   "prompts on this model (bisection over real runs; parameters unchanged), e.g. to carry a "
                   "NAMM to another model at the kept fraction it had on its own")
    p.add_argument("--keep-stats", action="store_true",
                   help="keep the --namm's normalisation statistics (do not recollect them); with "
                   "--fit-threshold, only the threshold changes")
    add_model_args(p)
    add_engine_args(p)
    p.set_defaults(func=run)


CALIBRATION_FILE = "calibration.json"


def run(args: argparse.Namespace) -> int:
    if args.keep_stats and (args.namm is None or args.fit_threshold is None):
        raise ValueError("--keep-stats keeps a NAMM's statistics and only refits its threshold: give --namm and "
                         "--fit-threshold RATIO with it.")
    if args.fit_threshold is not None and not 0.0 < args.fit_threshold < 1.0:
        raise ValueError(f"--fit-threshold is a kept fraction in (0, 1), e.g. 0.3; got {args.fit_threshold}.")
    model, tokenizer = model_from_args(args)
    namm = load_namm(args.namm) if args.namm else NAMM(NAMMConfig(evolved_on=args.model))
    if args.keep_stats and namm.norm is None:
        raise ValueError(f"--keep-stats: the NAMM {args.namm!r} has no normalisation statistics to keep; "
                         "drop --keep-stats to collect them on this model.")
    if args.perturb:
        gen = torch.Generator().manual_seed(args.seed)
        noise = torch.randn(namm.num_params, generator=gen, dtype=torch.float64).float() * args.perturb
        namm = namm.with_params(namm.get_flat() + noise)
    engine = Engine(model, tokenizer, config=engine_config_from_args(args, EngineConfig(**namm.config.schedule)))
    prompts = []
    for task in [t for t in args.tasks.split(",") if t]:
        for length in [int(x) for x in args.lengths.split(",") if x]:
            samples = load_task(task, tokenizer, length=length, n=args.samples, seed=args.seed, split="train")
            prompts.extend(s.prompt for s in samples)
    # the NAMM records the conditions it is calibrated (and will be evolved and run) under
    chat = namm.config.chat if args.chat is None else args.chat
    namm = namm.with_config(**schedule_of(engine.config), chat=chat)
    record = {"source": args.namm, "model": args.model, "dtype": args.dtype, "tasks": args.tasks,
              "lengths": args.lengths, "samples": args.samples, "seed": args.seed, "split": "train",
              "perturb": args.perturb, "statistics": "kept from the source" if args.keep_stats else "collected"}
    if not args.keep_stats:
        namm = calibrate(engine, namm, prompts, progress=not args.quiet)
    if args.fit_threshold is not None:
        namm, record["threshold_fit"] = fit_threshold(engine, namm, prompts, args.fit_threshold,
                                                      progress=not args.quiet)
    path = namm.save_pretrained(args.out)
    (path / CALIBRATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    done = "kept its statistics" if args.keep_stats else "calibrated"
    fit = record.get("threshold_fit")
    fit = f"; threshold {fit['threshold']:.4g} keeps {fit['kept']:.3f} (target {fit['target']})" if fit else ""
    print(f"{done} NAMM on {len(prompts)} prompts{fit} -> {path}")
    return 0
