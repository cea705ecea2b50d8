"""``namm bench``: one model, one process, every method at every prompt length, ratios to the full
cache and to plain transformers.

For each length (a passkey prompt of that many tokens from :mod:`namm.tasks`, raw): plain
transformers, then each method under the engine's schedule (the NAMM's recorded one): the full
cache, each baseline at ``keep_ratio``, and the NAMM twice, keeping everything (budget mode at
100%: its whole feature and scorer path, nothing evicted) and at ``keep_ratio``. Each run measures
the prefill's wall time, peak KV bytes and peak RSS, and at the decode lengths greedy tokens/s.
Then the dtype check (:func:`dtype_check`) and the targets (:mod:`namm.bench.targets`).

A length beyond the model's maximum position is skipped; a run that runs out of memory is
recorded as skipped and the bench goes on.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from namm.bench.measure import Measurement, engine_run, plain_run, prompt_ids
from namm.bench.targets import FULL, NAMM_ALL, READ_ALL, Target, evaluate_targets, kept_label, kv_bound_bytes
from namm.engine import Engine
from namm.models import DEFAULT_MODEL, load_model
from namm.policies import POLICIES, MemoryPolicy, make_policy
from namm.policies.full import FullCache
from namm.policies.namm import NAMMPolicy
from namm.sequence import EngineConfig, cache_spec

log = logging.getLogger(__name__)

PLAIN = "plain HF"
READ_METHOD = "read"  # the --methods name of the READ_ALL row
DTYPE_CHECK_MAX_TOKENS = 1024  # the keep-all error is taken on a prompt of at most this many tokens

__all__ = ["PLAIN", "BenchConfig", "BenchResult", "run_bench"]


@dataclass
class BenchConfig:
    """One bench run; every field is a ``namm bench`` flag.

    lengths:        prompt lengths in tokens (a length the model cannot reach is skipped).
    methods:        "full", "namm" (two rows: keep-all and ``keep_ratio``), baselines (at ``keep_ratio``)
                    and "read": H2O keeping everything, the attention read with next to no feature
                    work, so the floor of any policy that reads the attention weights.
    decode_lengths: lengths at which greedy decoding speed is measured (``decode_tokens`` tokens).
    repeats:        runs per measurement; the fastest prefill counts (and the fastest decode).
    namm:           NAMM folder, shipped name or parameter file; None: the shipped NAMM for the
                    model, else a zero NAMM (keeps everything), calibrated on the shortest prompt.
    chunk_size / delay: override the NAMM's schedule (every method runs on the same one).
    """

    model: str = DEFAULT_MODEL
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    methods: tuple[str, ...] = ("full", "streaming", "h2o", "snapkv", "tova", "expected-attention", "kvzip",
                                "ada-snapkv", "read", "namm")
    keep_ratio: float = 0.25
    decode_lengths: tuple[int, ...] = (4096, 8192)
    decode_tokens: int = 32
    repeats: int = 1
    dtype: str | None = None
    device: str | None = None
    namm: str | None = None
    chunk_size: int | None = None
    delay: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.lengths = tuple(sorted(set(self.lengths)))
        self.decode_lengths = tuple(sorted(set(self.decode_lengths)))
        self.methods = tuple(m.lower().replace("_", "-") for m in self.methods)
        if not self.lengths or any(not isinstance(n, int) or n < 16 for n in self.lengths):
            raise ValueError(f"lengths must be token counts >= 16, got {list(self.lengths)}.")
        unknown = [m for m in self.methods if m not in POLICIES and m != READ_METHOD]
        if unknown:
            raise ValueError(f"Unknown methods {unknown}; known: {', '.join(sorted([*POLICIES, READ_METHOD]))}.")
        if not 0 < self.keep_ratio < 1:
            raise ValueError(f"keep_ratio must be in (0, 1), got {self.keep_ratio!r}.")
        for name in ("decode_tokens", "repeats"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (1 if name == "repeats" else 0):
                raise ValueError(f"{name} must be a {'positive' if name == 'repeats' else 'non-negative'} integer.")


@dataclass
class BenchResult:
    config: BenchConfig
    device: str
    dtype: str
    namm: str  # which NAMM ran, in words
    schedule: dict
    lengths: list[dict]  # {"length", "tokens", "skipped"} per requested length
    rows: list[Measurement] = field(default_factory=list)
    kv_bounds: dict[int, int] = field(default_factory=dict)
    dtype_check: dict = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)

    def row(self, method: str, length: int) -> Measurement | None:
        return next((r for r in self.rows if r.method == method and r.length == length and r.skipped is None), None)

    def methods(self) -> list[str]:
        return list(dict.fromkeys(r.method for r in self.rows))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["kv_bounds"] = {str(k): v for k, v in self.kv_bounds.items()}
        return out


def method_rows(methods: tuple[str, ...], keep_ratio: float, namm) -> list[tuple[str, Callable[[], MemoryPolicy]]]:
    """(row name, policy factory) for each method; "namm" gives two rows."""
    rows = []
    for name in methods:
        if name == "full":
            rows.append((FULL, FullCache))
        elif name == READ_METHOD:
            rows.append((READ_ALL, lambda: make_policy("h2o", keep_ratio=1.0)))
        elif name == "namm":
            rows.append((NAMM_ALL, lambda: NAMMPolicy(namm, keep_ratio=1.0)))
            rows.append((kept_label("namm", keep_ratio), lambda: NAMMPolicy(namm, keep_ratio=keep_ratio)))
        else:
            rows.append((kept_label(name, keep_ratio), lambda name=name: make_policy(name, keep_ratio=keep_ratio)))
    return rows


def resolve_namm(config: BenchConfig, engine_for: Callable[[EngineConfig], Engine], prompt: torch.Tensor):
    """(NAMM, what it is in words): --namm, else the shipped one for the model, else a zero NAMM
    calibrated on the shortest prompt (it keeps everything)."""
    from namm.memory.calibration import calibrate
    from namm.memory.model import NAMM, default_pretrained
    from namm.policies.namm import load_namm

    if config.namm:
        return load_namm(config.namm), f"--namm {config.namm}"
    shipped = default_pretrained(config.model)
    if shipped is not None:
        return load_namm(shipped), f"shipped NAMM {shipped!r}"
    zero = NAMM()
    engine = engine_for(EngineConfig(**zero.config.schedule))
    calibrated = calibrate(engine, zero, [prompt], max_new_tokens=1, progress=False)
    return calibrated, "zero NAMM (no NAMM shipped, no --namm): scores 0, keeps everything; calibrated on one prompt"


def run_bench(config: BenchConfig, progress: bool = True) -> BenchResult:
    """Measure every method at every length; see the module docstring."""
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    torch.manual_seed(config.seed)

    def engine_for(schedule: EngineConfig) -> Engine:
        overrides = {k: v for k, v in (("chunk_size", config.chunk_size), ("delay", config.delay)) if v is not None}
        return Engine(model, tokenizer, config=EngineConfig(**{**schedule.__dict__, **overrides}))

    probe = engine_for(EngineConfig())  # to build the prompts; every method runs on the NAMM's schedule
    prompts = {length: _prompt_for(probe, config, length) for length in config.lengths}
    ready = [ids for ids, _ in prompts.values() if ids is not None]
    if not ready:
        raise ValueError("No length can be run: " + "; ".join(f"{n}: {why}" for n, (_, why) in prompts.items()))
    namm, namm_text = resolve_namm(config, engine_for, ready[0])
    engine = engine_for(EngineConfig(**namm.config.schedule))
    dtype = next(model.parameters()).dtype
    result = BenchResult(config, str(engine.device), str(dtype).removeprefix("torch."), namm_text,
                         dict(engine.config.__dict__), lengths=[])
    rows = method_rows(config.methods, config.keep_ratio, namm)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(config.lengths) * (len(rows) + 1), desc="namm bench", unit="run", disable=not progress)
    for length in config.lengths:
        ids, skipped = prompts[length]
        result.lengths.append({"length": length, "tokens": None if ids is None else ids.numel(), "skipped": skipped})
        if ids is None:
            log.warning("%d tokens: skipped (%s)", length, skipped)
            result.rows += [Measurement(name, length, skipped=skipped) for name in [PLAIN] + [r[0] for r in rows]]
            bar.update(len(rows) + 1)
            continue
        decode = config.decode_tokens if length in config.decode_lengths else 0
        for name, run in [(PLAIN, lambda: plain_run(model, ids, decode, PLAIN, length))] + [
                (name, lambda make=make, name=name: engine_run(engine, make(), ids, decode, name, length))
                for name, make in rows]:
            bar.set_postfix_str(f"{length} tokens, {name}")
            result.rows.append(_best_of(run, config.repeats, name, length))
            bar.update(1)
        result.kv_bounds[length] = kv_bound(model, engine.config, ids.numel(), config.keep_ratio)
    bar.close()
    result.dtype_check = dtype_check(config, model, tokenizer, engine, namm, result)
    result.targets = evaluate_targets(result.rows, config.keep_ratio, result.kv_bounds)
    return result


def _prompt_for(engine: Engine, config: BenchConfig, length: int) -> tuple[torch.Tensor | None, str | None]:
    limit = engine.max_length()
    new = config.decode_tokens if length in config.decode_lengths else 1
    if limit is not None and length > limit:
        return None, f"beyond the model's maximum length of {limit} tokens"
    n = length if limit is None else min(length, limit - new)  # room for the decoded tokens
    try:
        return prompt_ids(engine, n, config.seed), None
    except ValueError as exc:  # too short for the task's template
        return None, str(exc)


def _best_of(run: Callable[[], Measurement], repeats: int, name: str, length: int) -> Measurement:
    """The run with the fastest prefill (with the fastest decoding of all runs), or a skipped
    measurement if it runs out of memory."""
    runs = []
    for _ in range(repeats):
        _release_memory()  # so the RSS growth of this run is its own
        try:
            runs.append(run())
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not isinstance(exc, MemoryError) and "memory" not in str(exc).lower():
                raise
            log.warning("%d tokens, %s: skipped (out of memory)", length, name)
            return Measurement(name, length, skipped=f"out of memory: {str(exc).splitlines()[0][:120]}")
    best = min(runs, key=lambda m: m.prefill_s)
    best.decode_tokens_per_s = max((m.decode_tokens_per_s for m in runs if m.decode_tokens_per_s), default=None)
    log.info("%d tokens, %s: prefill %.2f s", length, name, best.prefill_s)
    return best


def _release_memory() -> None:
    """Collect garbage and hand the allocator's free heap back to the OS (glibc; elsewhere a no-op)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def kv_bound(model, schedule: EngineConfig, n_tokens: int, keep_ratio: float) -> int:
    """:func:`~namm.bench.targets.kv_bound_bytes` for this model's layers and dtype."""
    spec = cache_spec(model)
    per_token = 2 * spec.kv_heads * spec.head_dim * next(model.parameters()).element_size()
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(text, "sliding_window", None) or n_tokens
    sliding = [(per_token, window) for i in range(spec.num_layers) if i not in spec.managed_layers]
    return kv_bound_bytes(n_tokens, keep_ratio, schedule.chunk_size, schedule.delay,
                          [per_token] * len(spec.managed_layers), sliding)


def dtype_check(config: BenchConfig, model, tokenizer, engine: Engine, namm, result: BenchResult) -> dict:
    """The keep-all error at the run's dtype (max |logit difference| of the engine's keep-all runs
    against plain transformers at the same dtype, top-1 agreement with plain float32) and, when the
    run is not float32, its prefill speed against float32 at the longest length up to 4K."""
    from namm.bench.dtype import keep_all_error, speed_against_fp32

    ran = [d for d in result.lengths if d["tokens"]]
    if not ran:
        return {}
    ids = prompt_ids(engine, min(ran[0]["tokens"], DTYPE_CHECK_MAX_TOKENS), config.seed)
    policies = {FULL: FullCache(), NAMM_ALL: NAMMPolicy(namm, keep_ratio=1.0)}
    fp32 = None
    if next(model.parameters()).dtype != torch.float32:
        fp32 = load_model(config.model, dtype="float32", device=config.device)[0]
    check = {"dtype": result.dtype, "tokens": ids.numel(), **keep_all_error(model, engine, policies, ids, fp32)}
    if fp32 is not None:
        speed_length = max((d["length"] for d in ran if d["length"] <= 4096), default=ran[0]["length"])
        check["speed"] = speed_against_fp32(fp32, tokenizer, engine, policies, result, speed_length)
    return check
