"""The real offline default model (slow: loads SmolLM2-135M, ~30 s, then a few CPU-seconds per run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from namm import Engine, load_model, make_policy

pytestmark = pytest.mark.slow
DOC = Path(__file__).resolve().parents[1] / "examples" / "demo_document.txt"
QUESTION = "What is the access code for the archive room, and who set it?"


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


def test_keep_all_matches_transformers(smollm2):
    model, tok = smollm2
    ids = tok(DOC.read_text(), return_tensors="pt").input_ids[:, :700]
    with torch.inference_mode():
        ref = model(ids).logits[0, -1]
    engine = Engine(model, tok)
    with engine.running():
        got = engine.start().feed(ids)
    assert (got - ref).abs().max().item() < 1e-3


def test_answers_the_demo_question_offline(smollm2):
    model, tok = smollm2
    out = Engine(model, tok).generate(DOC.read_text() + "\n\n" + QUESTION, max_new_tokens=24)
    assert "4-7-1-9" in out.text
    assert out.prompt_tokens > 1900 and out.report.kept_fraction == 1.0


@pytest.mark.parametrize("name", ["streaming", "h2o", "l2", "snapkv", "tova", "pyramidkv"])
def test_baselines_keep_about_their_ratio(smollm2, name):
    model, tok = smollm2
    out = Engine(model, tok).generate(DOC.read_text() + "\n\n" + QUESTION, max_new_tokens=8,
                                      policy=make_policy(name, keep_ratio=0.3))
    assert 0.28 < out.report.kept_fraction < 0.33
