"""``namm rl data`` and ``namm rl train``: the Decision Transformer testbed (:mod:`namm.rl`).

Flags map one to one onto :class:`namm.rl.data.DataConfig` and :class:`namm.rl.train.TrainConfig`
(``--ars-iterations`` sets ``ars_iterations``). Evaluate with ``namm eval --tasks rl:<task>``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from namm.rl.envs import TASKS

HELP = {
    "seed": "seed of everything random (same seed, same output)",
    "horizon": "episode steps (default: the task's); an episode is 3 x horizon - 1 tokens",
    "ars_iterations": "ARS updates for the expert (default: the task's)",
    "ars_directions": "ARS random directions per update (default: the task's)",
    "medium_level": "the medium policy reaches this share of the way from random to expert",
    "steps": "optimiser steps", "batch_size": "trajectory windows per step",
    "threads": "torch threads (1 when other jobs share the cores)",
    "target_return": "return to go at t = 0 in rollouts (default: the best episode return in the data)",
    "full_episode_prob": "share of windows that are whole episodes from t = 0 (the others start at a random step)",
}


def add_parser(sub) -> None:
    p = sub.add_parser("rl", help="the Decision Transformer testbed: make offline data, train the model",
                       description="Make the offline data (an ARS expert and mixed-quality episodes) and train a "
                                   "Decision Transformer on it; evaluate with `namm eval --tasks rl:TASK`.")
    rl = p.add_subparsers(dest="rl_command", metavar="STEP", required=True)
    data = rl.add_parser("data", help="train the expert, measure the reference returns, record the episodes")
    data.add_argument("--out", default=None, help="output folder (default: runs/rl/TASK/data)")
    data.add_argument("--force", action="store_true", help="regenerate even if OUT holds this dataset")
    _add_fields(data, "DataConfig")
    data.set_defaults(func=run_data)
    train = rl.add_parser("train", help="train a Decision Transformer on a dataset (deterministic for a seed)")
    train.add_argument("--task", default=None, choices=sorted(TASKS),
                       help="the control task whose default folders to use (default halfcheetah)")
    train.add_argument("--data", default=None, help="dataset folder (default: runs/rl/TASK/data)")
    train.add_argument("--out", default=None, help="output folder (default: runs/rl/<the data's task>/dt)")
    _add_fields(train, "TrainConfig")
    train.set_defaults(func=run_train)
    for parser in (data, train):
        parser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bar")


def _config_class(name: str):
    from namm.rl import data, train

    return {"DataConfig": data.DataConfig, "TrainConfig": train.TrainConfig}[name]


def _add_fields(parser: argparse.ArgumentParser, name: str) -> None:
    """One flag per field of the config dataclass, typed from its annotation."""
    for field in dataclasses.fields(_config_class(name)):
        kind = {"int": int, "float": float, "str": str}[str(field.type).split(" ")[0]]
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        extra = {"choices": sorted(TASKS)} if field.name == "task" else {}
        parser.add_argument(flag, type=kind, default=default, help=HELP.get(field.name, f"default {default}"), **extra)


def _config(args: argparse.Namespace, name: str):
    cls = _config_class(name)
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def run_data(args: argparse.Namespace) -> int:
    from namm.rl.data import default_data_dir, generate_dataset

    config = _config(args, "DataConfig")
    out = Path(args.out) if args.out else default_data_dir(config.task)
    data = generate_dataset(config, out, force=args.force, progress=not getattr(args, "quiet", False))
    meta = data.meta
    ref = meta["ref_returns"]
    print(f"{meta['task']} ({meta['env_id']}), horizon {meta['horizon']}: {meta['episodes']} episodes, "
          f"{meta['transitions']} transitions in {out}")
    print(f"reference returns: expert {ref['expert']:.1f} ± {ref['expert_std']:.1f} (= 100), random "
          f"{ref['random']:.1f} ± {ref['random_std']:.1f} (= 0), {ref['episodes']} episodes each")
    for source, stats in meta["sources"].items():
        normalised = "-" if stats["mean_normalised"] is None else f"{stats['mean_normalised']:.1f}"
        print(f"  {source:7s} {stats['episodes']:4d} episodes, mean return {stats['mean_return']:8.1f} "
              f"(normalised {normalised})")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from namm.rl.data import default_data_dir
    from namm.rl.train import default_model_dir, train

    config = _config(args, "TrainConfig")
    data = Path(args.data) if args.data else default_data_dir(args.task or "halfcheetah")
    model = train(data, Path(args.out) if args.out else None, config, progress=not getattr(args, "quiet", False))
    task = model.config.task
    out = Path(args.out) if args.out else default_model_dir(task)
    log = (out / "train_log.csv").read_text(encoding="utf-8").splitlines()
    last = dict(zip(log[0].split(","), log[-1].split(",")))
    print(f"wrote {out / 'model.safetensors'} and config.json: {config.steps} steps, final loss {last['loss']}, "
          f"{last['seconds']} s")
    print(f"evaluate it with: namm eval --tasks rl:{task} --model {out} --methods full,h2o,snapkv "
          "--keep-ratios 0.25,0.5 --limit 10 --out DIR")
    return 0
