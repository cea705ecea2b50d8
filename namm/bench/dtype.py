"""The bench's dtype check: how far a reduced-precision run (``--dtype bfloat16``) moves the logits,
and how much faster it reads a prompt than float32 on the same machine."""

from __future__ import annotations

import torch

from namm.bench.measure import engine_run, plain_run, prompt_ids
from namm.engine import Engine

__all__ = ["keep_all_error", "speed_against_fp32"]


def _plain_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """(n, vocab) float32 logits of the model's own forward over ``ids``."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(input_ids=ids.reshape(1, -1).to(device), use_cache=False).logits[0].float()


def _top1(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits.argmax(-1) == reference.argmax(-1)).float().mean())


def keep_all_error(model, engine: Engine, policies: dict, ids: torch.Tensor, fp32_model=None) -> dict:
    """Per keep-all policy: max |logit difference| of the engine against plain transformers at the
    model's dtype over every prompt position, and top-1 agreement with plain float32
    (``fp32_model``; None: the model is float32 itself)."""
    plain = _plain_logits(model, ids)
    reference = plain if fp32_model is None else _plain_logits(fp32_model, ids)
    out: dict = {"plain HF": {"max_abs_logit_diff": 0.0, "top1_vs_fp32": _top1(plain, reference)}}
    for name, policy in policies.items():
        with engine.running():
            logits = engine.start(policy).feed(ids, all_logits=True, end_of_prompt=True)
        out[name] = {"max_abs_logit_diff": float((logits - plain).abs().max()), "top1_vs_fp32": _top1(logits, reference)}
    return out


def speed_against_fp32(fp32_model, tokenizer, engine: Engine, policies: dict, result, length: int) -> dict:
    """Prefill time at ``length`` of the run's rows (plain, and each policy in ``policies``) divided
    by the same prefill in float32, measured now on the same machine."""
    from namm.bench.run import PLAIN

    tokens = next(d["tokens"] for d in result.lengths if d["length"] == length)
    ids = prompt_ids(engine, tokens, result.config.seed)
    fp32_engine = Engine(fp32_model, tokenizer, config=engine.config)
    fp32 = {PLAIN: plain_run(fp32_model, ids, 0).prefill_s}
    for name, policy in policies.items():
        fp32[name] = engine_run(fp32_engine, policy, ids, 0, name).prefill_s
    out = {"length": length}
    for name, seconds in fp32.items():
        row = result.row(name, length)
        if row is not None:
            out[name] = {"seconds": row.prefill_s, "fp32_seconds": seconds, "ratio": row.prefill_s / seconds}
    return out
