"""The command line's streams: ``-`` reads stdin, progress bars on stderr, ``--quiet`` silences them."""

from __future__ import annotations

import functools
import io
import json
import subprocess
import sys

import pytest

import namm.progress
from namm.cli import main

PROMPT = "the quick brown fox jumps over the lazy dog " * 12  # 527 tokens once stripped
ARGS = ["--model", "tiny-llama", "--no-chat", "--max-new-tokens", "4", "--chunk-size", "64"]


def test_dash_reads_the_prompt_from_stdin(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT))
    assert main(["--quiet", "generate", "-", "--json", *ARGS]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == len(PROMPT.strip())
    doc = tmp_path / "doc.txt"
    doc.write_text(PROMPT)
    monkeypatch.setattr("sys.stdin", io.StringIO("question?\n"))  # the document from --file, the question piped
    assert main(["--quiet", "generate", "--file", str(doc), "-", "--json", *ARGS]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == len(PROMPT.strip() + "\n\nquestion?")


def test_progress_bars_unless_quiet(capsys, monkeypatch):
    monkeypatch.setattr(namm.progress, "BAR_DELAY_S", 0.0)  # show every bar, however quick the step
    assert main(["generate", PROMPT, *ARGS]) == 0
    err = capsys.readouterr().err
    assert "loading model tiny-llama" in err
    assert "reading prompt" in err and "527/527" in err
    assert "generating" in err and "4/4" in err
    for quiet in (["--quiet", "generate"], ["generate", "--quiet"]):
        assert main([*quiet, PROMPT, *ARGS]) == 0
        err = capsys.readouterr().err
        assert "reading prompt" not in err and "loading model" not in err


def test_quiet_prints_nothing_on_stderr():
    """A real process: no bars, no transformers deprecation warnings, no logs; the prompt from stdin."""
    cmd = [sys.executable, "-m", "namm.cli", "--quiet", "generate", "-", "--json", *ARGS]
    done = subprocess.run(cmd, input=PROMPT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert json.loads(done.stdout)["prompt_tokens"] == len(PROMPT.strip())


def test_quiet_silences_the_gguf_conversion_bar(monkeypatch):
    gguf_loader = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    monkeypatch.setattr(gguf_loader, "tqdm", gguf_loader.tqdm)  # restored after the test
    namm.progress.silence_third_party()
    assert isinstance(gguf_loader.tqdm, functools.partial)
    assert gguf_loader.tqdm(range(3)).disable
