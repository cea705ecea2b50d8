"""``namm inspect``: the recorded trace, the self-contained page, and the page in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import numpy as np
import pytest
import torch

from namm import NAMM, Engine, make_policy
from namm.cli import main
from namm.inspect import trace_memory
from namm.inspect_page import render_page
from namm.policies.namm import NAMMPolicy
from namm.sequence import EngineConfig

SCHEDULE = EngineConfig(chunk_size=32, delay=48)
PROMPT = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def streaming_trace(tiny_llama):
    model, tok = tiny_llama
    return trace_memory(Engine(model, tok, config=SCHEDULE), PROMPT, make_policy("streaming", budget=40), max_new_tokens=6)


def test_trace_records_kept_tokens_scores_and_curve(streaming_trace):
    trace = streaming_trace
    assert trace.seen == 155 and trace.n_prompt == 150 and len(trace.token_ids) == 156
    assert trace.held.shape == (3, 2, 155)
    # the last eviction (prompt end, 150) kept 4 sinks + the 36 newest; 5 decoded tokens came after
    expected = np.zeros(155, dtype=bool)
    expected[:4] = expected[114:] = True
    assert (trace.held == expected).all()
    assert trace.share.tolist() == expected.astype(float).tolist()
    # StreamingLLM ranks by absolute position, sinks forced in (+inf); decoded tokens never ranked
    scores = trace.scores[0, 0]
    assert np.isposinf(scores[:4]).all()
    assert scores[4:150].tolist() == list(range(4, 150))
    assert np.isnan(scores[150:]).all()
    assert trace.curve_x.tolist() == [0, 48, 48, 96, 96, 144, 144, 150, 150, 155]
    assert trace.curve_y[:, 2].tolist() == [0, 48, 40, 88, 40, 88, 40, 46, 40, 45]
    assert trace.report.final_len == [45, 45, 45]


def test_namm_scores_are_what_it_kept_by(tiny_llama):
    model, tok = tiny_llama
    vec = torch.zeros(4172)
    vec[-1], vec[-26 + 4] = -1.0, 1.5  # score = -1 + 1.5 cos(age * w_0), the same for every head
    trace = trace_memory(Engine(model, tok, config=SCHEDULE), PROMPT, NAMMPolicy(NAMM(params=vec)), max_new_tokens=4)
    ranked = ~np.isnan(trace.scores)
    assert 0 < trace.share.mean() < 0.7 and ranked[..., :150].all()
    # threshold selection: a token survived its last ranking exactly when it scored >= 0
    assert (trace.held[ranked] == (trace.scores[ranked] >= 0)).all()


def test_page_is_self_contained(streaming_trace):
    page = render_page(streaming_trace)
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)  # every resource inline
    assert "@import" not in page and "url(" not in page
    assert page.count('src="data:image/png;base64,') == 2
    data = json.loads(re.search(r'id="namm-data">(.*?)</script>', page, re.S).group(1))
    assert data["layers"] == [0, 1, 2] and data["heads"] == 2 and data["n_prompt"] == 150
    assert data["kept"][0] == [2, 2, 2] and data["kept"][50] == [0, 0, 0] and data["kept"][155] is None
    assert data["score"][0] == ["inf"] * 3 and data["score"][50] == [50.0] * 3 and data["score"][152] == [None] * 3
    assert page.count('class="t') == 156


def test_cli_writes_the_page(tmp_path, capsys):
    out = tmp_path / "page.html"
    argv = ["--quiet", "inspect", "--model", "tiny-llama", "--no-chat", "the quick brown fox jumps " * 12,
            "--policy", "h2o", "--keep-ratio", "0.3", "--delay", "64", "--chunk-size", "32",
            "--max-new-tokens", "4", "--out", str(out)]
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert "What the memory kept: h2o on tiny-llama" in out.read_text(encoding="utf-8")


def _browser_or_skip():
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install selenium)")
    if missing:
        reason = f"headless Chromium check needs {', '.join(missing)}; apt-get install -y chromium chromium-driver"
        if os.environ.get("NAMM_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)


def test_page_renders_in_headless_chromium(streaming_trace, tmp_path):
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    page = tmp_path / "page.html"
    page.write_text(render_page(streaming_trace), encoding="utf-8")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,1000", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(page.as_uri())
        spans = driver.find_elements(By.CSS_SELECTOR, "#doc .t")
        assert len(spans) == 156
        ActionChains(driver).move_to_element(spans[50]).perform()
        tip = driver.find_element(By.ID, "tip")
        assert tip.is_displayed() and "0/2 evicted" in tip.text and "50" in tip.text
        shot = tmp_path / "page.png"
        assert driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
        assert errors == []
    finally:
        driver.quit()


def test_trace_of_ragged_heads(tiny_llama):
    """Ada-KV keeps ragged heads: the trace holds each head's own tokens, never the padding."""
    model, tok = tiny_llama
    trace = trace_memory(Engine(model, tok, config=SCHEDULE), PROMPT, make_policy("ada-snapkv", budget=40, window=8),
                         max_new_tokens=6)
    counts = trace.held.sum(-1)  # (layers, kv_heads)
    assert counts.tolist() == trace.report.head_len and (counts[:, 0] != counts[:, 1]).any()
    assert counts.sum(-1).tolist() == [2 * 40 + 2 * 5] * 3  # the layer's budget, shared, then 5 decoded
    assert trace.curve_y[-1].tolist() == [45.0] * 3
    ranked = ~np.isnan(trace.scores)
    assert ranked[..., :150].all() and not ranked[..., 150:].any()
