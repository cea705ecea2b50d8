"""`namm generate` and `namm calibrate` end to end on a tiny random model."""

from __future__ import annotations

import io
import json

import pytest
import torch

from namm.cli import main
from namm.memory import NAMM

PROMPT = "the quick brown fox jumps over the lazy dog " * 12  # 527 tokens once stripped


def run_json(capsys, *argv) -> dict:
    assert main(["--quiet", "generate", "--model", "tiny-llama", "--no-chat", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_reports_memory(capsys):
    out = run_json(capsys, PROMPT, "--policy", "streaming", "--keep-ratio", "0.3", "--max-new-tokens", "8",
                   "--delay", "128", "--chunk-size", "64")
    mem = out["memory"]
    assert out["prompt_tokens"] == 527 and out["new_tokens"] == 8
    assert mem["tokens_seen"] == 534
    # evicted to ceil(0.3 * 527) = 159 at the end of the prompt, then 7 decoded tokens were added
    assert mem["final_len"] == [166, 166, 166]
    assert mem["kept_fraction"] == pytest.approx(166 / 534)
    assert mem["kv_bytes"] < 0.35 * mem["kv_bytes_full"]


def test_generate_ada_reports_each_heads_tokens(capsys):
    out = run_json(capsys, PROMPT, "--policy", "ada-snapkv", "--keep-ratio", "0.3", "--max-new-tokens", "8",
                   "--delay", "128", "--chunk-size", "64")
    mem = out["memory"]
    # each layer keeps 2 x 159 tokens at the end of the prompt, shared unevenly by its 2 KV heads
    assert [sum(heads) for heads in mem["head_len"]] == [2 * 166] * 3
    assert any(a != b for a, b in mem["head_len"]) and mem["final_len"] == [166, 166, 166]
    assert mem["kept_fraction"] == pytest.approx(166 / 534)


def test_generate_reads_file_and_stdin(capsys, tmp_path, monkeypatch):
    doc = tmp_path / "doc.txt"
    doc.write_text(PROMPT)
    a = run_json(capsys, "--file", str(doc), "question?", "--max-new-tokens", "4")
    assert a["prompt_tokens"] == len((PROMPT.strip() + "\n\nquestion?").encode())
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT))
    b = run_json(capsys, "--max-new-tokens", "4")
    assert b["prompt_tokens"] == len(PROMPT.strip())
    assert b["memory"]["kept_fraction"] == 1.0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--policy", "h2o", "--budget", "0"], "budget"),
        (["--policy", "nope"], "Unknown policy"),
        (["--policy", "full", "--keep-ratio", "0.5"], "keeps every token"),
        (["--policy", "streaming", "--namm", "x"], "only apply to --policy namm"),
        (["--policy", "snapkv", "--keep-ratio", "0.3", "--per-head"], "only apply to --policy namm"),
        (["--policy", "h2o", "--keep-ratio", "0.3", "--keep", "threshold"], "only apply to --policy namm"),
        (["--file", "/no/such/file.txt"], "does not exist"),
        (["--model", "no-such-org/no-such-model-xyz"], "Could not find model"),
    ],
)
def test_generate_bad_input_is_a_clear_error(capsys, argv, message):
    assert main(["generate", "--model", "tiny-llama", "hello", *argv]) == 1
    assert message in capsys.readouterr().err


def test_calibrate_then_generate_with_perturbed_namm(capsys, tmp_path):
    out = tmp_path / "namm"
    assert main(["--quiet", "calibrate", "--model", "tiny-llama", "--out", str(out), "--tasks", "passkey",
                 "--lengths", "400", "--samples", "1", "--perturb", "0.5", "--delay", "64", "--chunk-size", "32"]) == 0
    namm = NAMM.from_pretrained(out)
    assert namm.config.delay == 64 and namm.norm is not None
    capsys.readouterr()
    res = run_json(capsys, PROMPT, "--policy", "namm", "--namm", str(out), "--max-new-tokens", "4")
    assert 0 < res["memory"]["kept_fraction"] < 1.0
    assert res["memory"]["evictions"] >= 8  # the NAMM's own schedule (delay 64) was used


def test_calibrate_fit_threshold_carries_a_namm_at_a_kept_fraction(capsys, tmp_path):
    """--fit-threshold RATIO refits only the threshold (with --keep-stats the statistics and the
    parameters stay the source's bit for bit); the NAMM then keeps about RATIO in threshold mode, and
    calibration.json says what was done."""
    source, fitted = tmp_path / "source", tmp_path / "fitted"
    common = ["--model", "tiny-llama", "--tasks", "passkey", "--lengths", "400", "--samples", "2",
              "--delay", "64", "--chunk-size", "32"]
    assert main(["--quiet", "calibrate", *common, "--out", str(source), "--perturb", "0.5"]) == 0
    assert main(["--quiet", "calibrate", *common, "--out", str(fitted), "--namm", str(source), "--keep-stats",
                 "--fit-threshold", "0.5"]) == 0
    a, b = NAMM.from_pretrained(source), NAMM.from_pretrained(fitted)
    assert torch.equal(a.get_flat(), b.get_flat())
    assert torch.equal(a.norm.mean, b.norm.mean) and torch.equal(a.norm.m2, b.norm.m2)
    assert b.config.threshold != a.config.threshold
    record = json.loads((fitted / "calibration.json").read_text())
    assert record["statistics"] == "kept from the source" and record["split"] == "train"
    assert record["threshold_fit"]["target"] == 0.5
    assert abs(record["threshold_fit"]["kept"] - 0.5) <= 0.05
    assert record["threshold_fit"]["threshold"] == pytest.approx(b.config.threshold)
    capsys.readouterr()
    res = run_json(capsys, PROMPT, "--policy", "namm", "--namm", str(fitted), "--max-new-tokens", "1",
                   "--keep", "threshold")
    assert 0.2 < res["memory"]["prefill"]["kept_fraction"] < 0.8


@pytest.mark.parametrize("argv, message", [
    (["--keep-stats"], "give --namm and --fit-threshold"),
    (["--fit-threshold", "1.5"], "kept fraction in (0, 1)"),
])
def test_calibrate_bad_fit_flags_are_clear_errors(capsys, tmp_path, argv, message):
    assert main(["calibrate", "--model", "tiny-llama", "--out", str(tmp_path / "x"), *argv]) == 1
    assert message in capsys.readouterr().err


def test_keep_flag_switches_a_budget_namm_to_threshold_mode(capsys, tmp_path):
    """--keep threshold runs a budget-evolved NAMM by its threshold (an emergent size), --keep budget
    at --keep-ratio; by default it runs in the budget mode it records."""
    out = tmp_path / "namm"
    assert main(["--quiet", "calibrate", "--model", "tiny-llama", "--out", str(out), "--tasks", "passkey",
                 "--lengths", "400", "--samples", "1", "--perturb", "0.5", "--delay", "64", "--chunk-size", "32"]) == 0
    namm = NAMM.from_pretrained(out)
    namm.with_config(keep="budget", keep_ratio=0.3, threshold=-1e6).save_pretrained(out)  # every score passes
    capsys.readouterr()
    own = run_json(capsys, PROMPT, "--policy", "namm", "--namm", str(out), "--max-new-tokens", "1")
    threshold = run_json(capsys, PROMPT, "--policy", "namm", "--namm", str(out), "--max-new-tokens", "1",
                         "--keep", "threshold")
    assert own["memory"]["prefill"]["kept_fraction"] == pytest.approx(0.3, abs=0.02)
    assert threshold["memory"]["prefill"]["kept_fraction"] == 1.0
    assert "threshold" in threshold["conditions"]["keep"] and "top-k" in own["conditions"]["keep"]
    assert main(["generate", "--model", "tiny-llama", PROMPT, "--policy", "namm", "--namm", str(out),
                 "--keep", "threshold", "--keep-ratio", "0.5"]) == 1
    assert "emergent" in capsys.readouterr().err


@pytest.mark.parametrize("command, hint", [("eval", "rows.jsonl"), ("evolve", "--resume")])
def test_ctrl_c_says_what_was_kept_instead_of_a_traceback(capsys, monkeypatch, tmp_path, command, hint):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(f"namm.commands.{command}.run", interrupted)
    argv = {"eval": ["eval", "--model", "tiny-llama", "--tasks", "passkey", "--methods", "full", "--out", str(tmp_path)],
            "evolve": ["evolve", "examples/tiny-test.toml", "--out", str(tmp_path / "run")]}[command]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"namm {command}: interrupted.") and hint in err and "Traceback" not in err
    with pytest.raises(KeyboardInterrupt):  # --verbose keeps the traceback
        main(["--verbose", *argv])
