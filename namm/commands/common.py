"""Flags shared by the commands: the model, the engine schedule and the memory policy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from namm.models import DEFAULT_MODEL, load_model
from namm.policies import POLICIES, MemoryPolicy, make_policy
from namm.sequence import EngineConfig


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help="smollm2 (offline default), gemma3-270m (offline), a local folder or a Hugging Face id")
    group.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    group.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine schedule")
    group.add_argument("--chunk-size", type=int, default=None, help="prefill chunk in tokens (default 128)")
    group.add_argument("--delay", type=int, default=None, help="evict every DELAY tokens processed (default 512)")
    group.add_argument("--no-evict-at-prefill-end", action="store_true",
                       help="only evict on the DELAY grid (as the reference NAMM), not also when the prompt ends")
    group.add_argument("--no-evict-during-prefill", action="store_true",
                       help="cache the whole prompt and compress it once at its end (SnapKV as published)")


def add_policy_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("memory policy")
    group.add_argument("--policy", default="full", help=f"one of: {', '.join(sorted(POLICIES))}")
    group.add_argument("--budget", type=int, default=None, help="tokens kept per layer (budget policies)")
    group.add_argument("--keep-ratio", type=float, default=None, help="fraction of tokens seen kept per layer")
    group.add_argument("--namm", default=None, help="NAMM checkpoint folder, pretrained name or reference vector file")
    group.add_argument("--max-cache", type=int, default=None, help="NAMM: cap on tokens kept per layer")


def model_from_args(args: argparse.Namespace):
    return load_model(args.model, dtype=args.dtype, device=args.device)


def engine_config_from_args(args: argparse.Namespace, defaults: EngineConfig | None = None) -> EngineConfig:
    """The schedule from the flags; unset flags take ``defaults`` (e.g. a NAMM's own schedule)."""
    base = defaults or EngineConfig()
    return EngineConfig(
        chunk_size=args.chunk_size or base.chunk_size,
        delay=args.delay or base.delay,
        evict_at_prefill_end=base.evict_at_prefill_end and not args.no_evict_at_prefill_end,
        evict_during_prefill=base.evict_during_prefill and not args.no_evict_during_prefill,
    )


def policy_schedule(policy: MemoryPolicy) -> EngineConfig:
    """The engine schedule a policy was made for (a NAMM's chunk size and delay), else the defaults."""
    return EngineConfig(**getattr(policy, "schedule", {}))


def policy_from_args(args: argparse.Namespace) -> MemoryPolicy:
    """Build the policy the flags describe; flags that do not apply to it are an error."""
    name = args.policy.lower()
    kwargs: dict = {}
    if args.budget is not None:
        kwargs["budget"] = args.budget
    if args.keep_ratio is not None:
        kwargs["keep_ratio"] = args.keep_ratio
    if name == "namm":
        if args.namm is not None:
            kwargs["namm"] = args.namm
        if args.max_cache is not None:
            kwargs["max_cache"] = args.max_cache
    elif args.namm is not None or args.max_cache is not None:
        raise ValueError("--namm and --max-cache only apply to --policy namm.")
    if name in ("full",) and kwargs:
        raise ValueError("--policy full keeps every token; drop --budget/--keep-ratio or choose another policy.")
    try:
        return make_policy(name, **kwargs)
    except TypeError as exc:
        raise ValueError(f"--policy {name}: {exc}") from exc


def read_prompt(prompt: str | None, file: str | None) -> str:
    """The prompt from a file (a document), an argument (a question), or both; else stdin."""
    parts = []
    if file:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"Prompt file {file!r} does not exist.")
        parts.append(path.read_text(encoding="utf-8"))
    if prompt:
        parts.append(prompt)
    if not parts and not sys.stdin.isatty():
        parts.append(sys.stdin.read())
    text = "\n\n".join(p.strip() for p in parts if p.strip())
    if not text:
        raise ValueError("No prompt: pass it as an argument, with --file, or on stdin.")
    return text
