"""Flags shared by the commands: the model, the engine schedule and the memory policy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from namm.models import DEFAULT_MODEL, load_model
from namm.policies import POLICIES, MemoryPolicy, make_policy
from namm.sequence import EngineConfig


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    """PROMPT ('-': stdin), --file and a command-level --quiet (generate, inspect)."""
    parser.add_argument("prompt", nargs="?", help="the prompt, or the question when --file gives the document; "
                        "'-' reads it from stdin")
    parser.add_argument("--file", help="read the prompt (a document) from this file; PROMPT is appended after it")
    parser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or warnings")


def engine_from_args(args: argparse.Namespace):
    """``(prompt, policy, Engine)`` as the prompt, policy, model and schedule flags say."""
    from namm.engine import Engine

    prompt = read_prompt(args.prompt, args.file)
    policy = policy_from_args(args)
    model, tokenizer = model_from_args(args)
    return prompt, policy, Engine(model, tokenizer, policy=policy,
                                  config=engine_config_from_args(args, policy_schedule(policy)))


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help="smollm2 (offline default), gemma3-270m (offline), a local folder or a Hugging Face id")
    group.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    group.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The schedule and prompt format; unset, they default to what a NAMM was evolved with."""
    group = parser.add_argument_group("engine schedule (default: the NAMM's recorded conditions, if any)")
    group.add_argument("--chunk-size", type=int, default=None, help="prefill chunk in tokens (default 128)")
    group.add_argument("--delay", type=int, default=None, help="evict every DELAY tokens processed (default 512)")
    group.add_argument("--evict-at-prefill-end", action=argparse.BooleanOptionalAction, default=None,
                       help="also evict when the prompt ends (default on); --no-evict-at-prefill-end: only on "
                            "the DELAY grid, as the reference NAMM")
    group.add_argument("--evict-during-prefill", action=argparse.BooleanOptionalAction, default=None,
                       help="evict on the DELAY grid while reading the prompt (default on); "
                            "--no-evict-during-prefill: compress the prompt once at its end (SnapKV as published)")
    group.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                       help="wrap the prompt in the tokenizer's chat template (--no-chat: raw)")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Model, memory policy and schedule flags: what every command that runs one prompt needs."""
    add_model_args(parser)
    add_policy_args(parser)
    add_engine_args(parser)


def add_policy_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("memory policy")
    group.add_argument("--policy", default="full", help=f"one of: {', '.join(sorted(POLICIES))}")
    group.add_argument("--budget", type=int, default=None, help="tokens kept per layer (budget policies)")
    group.add_argument("--keep-ratio", type=float, default=None, help="fraction of tokens seen kept per layer")
    group.add_argument("--namm", default=None, help="NAMM checkpoint folder, pretrained name or reference vector file "
                       "(default: the shipped NAMM evolved on --model, else the first shipped one)")
    group.add_argument("--keep", choices=("budget", "threshold"), default=None,
                       help="NAMM keep mode (default: the one it was evolved in): budget = each layer and head keeps "
                            "its top --keep-ratio of scores; threshold = the tokens scoring >= its threshold, an "
                            "emergent number per layer, head and prompt")
    group.add_argument("--max-cache", type=int, default=None, help="NAMM: cap on tokens kept per layer")
    group.add_argument("--per-head", action="store_true", default=None,
                       help="NAMM threshold mode: each KV head keeps exactly its own tokens scoring >= 0 "
                            "(ragged heads) instead of the count of the head that keeps most")


def model_from_args(args: argparse.Namespace):
    from namm.progress import loading

    with loading(f"loading model {args.model}", enabled=not getattr(args, "quiet", False)):
        return load_model(args.model, dtype=args.dtype, device=args.device)


def engine_config_from_args(args: argparse.Namespace, defaults: EngineConfig | None = None) -> EngineConfig:
    """The schedule from the flags; unset flags take ``defaults`` (e.g. a NAMM's own schedule)."""
    base = defaults or EngineConfig()
    return EngineConfig(
        chunk_size=args.chunk_size or base.chunk_size,
        delay=args.delay or base.delay,
        evict_at_prefill_end=_flag(args.evict_at_prefill_end, base.evict_at_prefill_end),
        evict_during_prefill=_flag(args.evict_during_prefill, base.evict_during_prefill),
    )


def _flag(value: bool | None, default: bool) -> bool:
    return default if value is None else value


def policy_schedule(policy: MemoryPolicy) -> EngineConfig:
    """The engine schedule a policy was made for (a NAMM's recorded one), else the defaults."""
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
        kwargs["namm"] = args.namm if args.namm is not None else shipped_namm(getattr(args, "model", None))
        if args.max_cache is not None:
            kwargs["max_cache"] = args.max_cache
        if getattr(args, "per_head", None):
            kwargs["per_head"] = True
        if getattr(args, "keep", None):
            kwargs["keep"] = args.keep
    elif args.namm is not None or args.max_cache is not None or getattr(args, "per_head", None) \
            or getattr(args, "keep", None):
        raise ValueError("--namm, --keep, --max-cache and --per-head only apply to --policy namm.")
    if name in ("full",) and kwargs:
        raise ValueError("--policy full keeps every token; drop --budget/--keep-ratio or choose another policy.")
    try:
        return make_policy(name, **kwargs)
    except TypeError as exc:
        raise ValueError(f"--policy {name}: {exc}") from exc


def shipped_namm(model: str | None) -> str:
    """The shipped NAMM ``--policy namm`` runs without ``--namm``: the one evolved on ``model``, else
    (zero-shot) the first shipped one."""
    from namm.memory.model import default_pretrained

    name = default_pretrained(model)
    if name is None:
        raise ValueError("--policy namm: no NAMM is shipped with the package; pass --namm DIR (a NAMM folder, "
                         "e.g. a run's mean/), or evolve one with `namm evolve CONFIG` and ship it with "
                         "`namm export RUN_DIR --to namm/pretrained/NAME`.")
    return name


def read_prompt(prompt: str | None, file: str | None) -> str:
    """The prompt from a file (a document), an argument (a question, "-" reads it from stdin), or
    both; with neither, stdin."""
    if prompt == "-":
        prompt = sys.stdin.read()
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
