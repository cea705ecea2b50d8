"""The ``namm`` command line: one subcommand per module in ``namm/commands``.

Each command module defines ``add_parser(subparsers)``, which registers its flags and sets
``func``; adding a command means adding its module and its name to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ("generate", "inspect", "calibrate", "eval", "evolve", "export", "bench", "rl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="namm",
        description="Learned, evolved KV-cache memory (Neural Attention Memory Models) for HF causal LMs.",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"namm.commands.{name}").add_parser(sub)
    return parser


# what an interrupted command kept, and how to go on (Ctrl-C prints this instead of a traceback)
RESUME_HINTS = {
    "eval": "Every finished row is in OUT/rows.jsonl; run the same command again to go on from there.",
    "evolve": "Every finished generation is checkpointed; add --resume to the same command to go on.",
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:  # transformers' bars (weights, GGUF de-quantising), warnings and deprecation notices
        from namm.progress import silence_third_party

        silence_third_party()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.verbose:
            raise
        print(f"namm {args.command}: interrupted. {RESUME_HINTS.get(args.command, '')}".rstrip(), file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as exc:
        if args.verbose:
            raise
        print(f"namm {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
