"""One set of conditions: a NAMM records what it was evolved under (schedule, chat, keep mode) and
`Engine`, `namm generate` and `namm eval` run it that way unless told otherwise."""

from __future__ import annotations

import json

import pytest

from namm.cli import main
from namm.engine import Engine, format_conditions
from namm.evaluation import EvalConfig, variants
from namm.evaluation.runner import resolve_conditions
from namm.memory.model import NAMM, NAMMConfig
from namm.policies.namm import NAMMPolicy

PROMPT = "the quick brown fox jumps over the lazy dog " * 12  # 527 tokens once stripped
RECORDED = dict(chunk_size=32, delay=64, evict_at_prefill_end=False, evict_during_prefill=True, chat=False,
                keep="budget", keep_ratio=0.3)


@pytest.fixture
def budget_namm(tmp_path) -> str:
    return str(NAMM(NAMMConfig(**RECORDED, evolved_on="tiny-llama")).save_pretrained(tmp_path / "namm"))


def test_old_folders_load_with_defaults(tmp_path):
    folder = NAMM(NAMMConfig(delay=256)).save_pretrained(tmp_path / "old")
    meta = json.loads((folder / "config.json").read_text())
    for key in ("evict_at_prefill_end", "evict_during_prefill", "chat", "keep", "keep_ratio"):
        del meta[key]  # a folder written before these were recorded
    (folder / "config.json").write_text(json.dumps(meta))
    c = NAMM.from_pretrained(folder).config
    assert (c.delay, c.keep, c.keep_ratio, c.chat, c.evict_at_prefill_end, c.evict_during_prefill) == \
        (256, "threshold", None, None, True, True)


def test_keep_mode_resolution():
    budget = NAMM(NAMMConfig(keep="budget", keep_ratio=0.3))
    assert NAMMPolicy(budget).keep == "budget" and NAMMPolicy(budget).keep_ratio == 0.3  # recorded
    assert NAMMPolicy(budget, keep_ratio=0.5).keep_ratio == 0.5  # explicit size wins
    assert NAMMPolicy(budget, max_cache=100).keep == "threshold"  # a cap means the threshold rule
    assert NAMMPolicy(NAMM(), budget=64).keep == "budget"
    assert NAMMPolicy(NAMM()).describe_keep() == "threshold (score >= 0)"
    assert NAMMPolicy(budget).describe_keep() == "budget, top-k NAMM scores, keep_ratio 0.3"
    with pytest.raises(ValueError, match="records none"):
        NAMMPolicy(NAMM(), keep="budget")
    with pytest.raises(ValueError, match="emergent"):
        NAMMPolicy(budget, keep="threshold", keep_ratio=0.2)
    with pytest.raises(ValueError, match="needs keep_ratio"):
        NAMMConfig(keep="budget")


def test_engine_runs_a_namm_under_its_recorded_conditions(tiny_llama, budget_namm):
    model, tok = tiny_llama
    policy = NAMMPolicy(budget_namm)
    engine = Engine(model, tok, policy=policy)  # no config: the NAMM's schedule
    assert (engine.config.chunk_size, engine.config.delay, engine.config.evict_at_prefill_end) == (32, 64, False)
    assert Engine(model, tok, policy=policy, delay=128).config.delay == 128  # overrides win
    assert engine.chat_for(None) is False and engine.chat_for(True) is True
    assert engine.conditions()["keep"] == "budget, top-k NAMM scores, keep_ratio 0.3"
    out = engine.generate(PROMPT, max_new_tokens=2)
    assert out.report.evictions == 8  # every 64 tokens of 527 + 1, and none at the prompt's end
    assert out.report.kept_fraction == pytest.approx((1 + 0.3 * 512 + 15) / 528, abs=0.01)


def generate_json(capsys, *argv) -> dict:
    assert main(["--quiet", "generate", "--model", "tiny-llama", "--json", PROMPT, "--max-new-tokens", "2",
                 *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_uses_and_reports_the_recorded_conditions(capsys, budget_namm):
    out = generate_json(capsys, "--policy", "namm", "--namm", budget_namm)
    assert out["conditions"] == {"chunk_size": 32, "delay": 64, "evict_at_prefill_end": False,
                                 "evict_during_prefill": True, "chat": False,
                                 "keep": "budget, top-k NAMM scores, keep_ratio 0.3"}
    assert out["memory"]["evictions"] == 8
    over = generate_json(capsys, "--policy", "namm", "--namm", budget_namm, "--delay", "128",
                         "--evict-at-prefill-end", "--keep-ratio", "0.5")
    assert (over["conditions"]["delay"], over["conditions"]["evict_at_prefill_end"]) == (128, True)
    assert over["conditions"]["keep"] == "budget, top-k NAMM scores, keep_ratio 0.5"
    assert over["memory"]["evictions"] == 5  # 128, 256, 384, 512 and the prompt's end
    assert main(["--quiet", "generate", "--model", "tiny-llama", PROMPT, "--max-new-tokens", "2",
                 "--policy", "namm", "--namm", budget_namm]) == 0
    text = capsys.readouterr().out
    assert "conditions       chunk 32, delay 64, evict during prefill, raw prompt, keep budget" in text


def test_eval_takes_the_namms_conditions_for_every_method(tiny_llama, budget_namm):
    _, tok = tiny_llama
    config = EvalConfig(tasks=["passkey"], methods=["full", "h2o", "namm"], keep_ratios=[0.5], namm=budget_namm)
    resolved, namm = resolve_conditions(config, tok)
    assert (resolved.chunk_size, resolved.delay, resolved.evict_at_prefill_end, resolved.evict_during_prefill,
            resolved.chat) == (32, 64, False, True, False)
    # a budget-evolved NAMM runs at its own keep ratio first, then at the others asked for
    got = [(v.method, v.setting, v.kwargs.get("keep_ratio")) for v in variants(resolved, namm)]
    assert got == [("full", "full", None), ("h2o", "keep=0.5", 0.5), ("namm", "threshold", None),
                   ("namm", "keep=0.3", 0.3), ("namm", "keep=0.5", 0.5)]
    explicit, _ = resolve_conditions(EvalConfig(tasks=["passkey"], methods=["namm"], namm=budget_namm, delay=512,
                                                chat=True), tok)
    assert (explicit.delay, explicit.chunk_size, explicit.chat) == (512, 32, True)
    plain, none = resolve_conditions(EvalConfig(tasks=["passkey"], methods=["full"]), tok)
    assert none is None and (plain.chunk_size, plain.delay, plain.chat) == (128, 512, False)


def test_format_conditions():
    line = format_conditions({"chunk_size": 128, "delay": 512, "evict_at_prefill_end": True,
                              "evict_during_prefill": False, "chat": True, "keep": "all"})
    assert line == "chunk 128, delay 512, evict at prompt end, chat template, keep all"


def test_engine_says_when_a_namm_runs_off_its_schedule(tiny_llama, budget_namm, caplog):
    model, tok = tiny_llama
    engine = Engine(model, tok)  # the default schedule, not the NAMM's
    policy = NAMMPolicy(budget_namm)
    with caplog.at_level("WARNING", logger="namm.engine"):
        engine.generate("hello there", max_new_tokens=1, policy=policy)
        engine.generate("hello again", max_new_tokens=1, policy=policy)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "chunk_size=32, delay=64, evict_at_prefill_end=False" in warnings[0]
    assert engine.conditions(policy)["chat"] is False  # the recorded chat choice still applies
