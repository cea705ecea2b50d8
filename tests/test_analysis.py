"""What a policy evicts: token kinds, kept fractions per layer / kind / age, the reports, the benchmark."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from namm import NAMM, Engine, make_policy
from namm.analysis import EvictionStats, comparison_markdown, eviction_stats, piece_kind, template_mask, token_kinds
from namm.models import byte_tokenizer
from namm.sequence import EngineConfig

SCHEDULE = EngineConfig(chunk_size=32, delay=64)
EDGES = (64, 128)
ROOT = Path(__file__).resolve().parent.parent


def _prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("piece, kind", [
    ("Ġthe", "word"), ("▁the", "word"), (" the", "word"), ("ing", "word"), ("x2", "word"),
    ("Ċ", "newline"), ("ĊĊ", "newline"), ("\n", "newline"), ("Ġ", "whitespace"), ("▁", "whitespace"),
    ("ĠĠĠ", "whitespace"), ("\t", "whitespace"), ("42", "digits"), ("Ġ2024", "digits"), (".", "punctuation"),
    ("),", "punctuation"), ("Ġ$", "punctuation"), ("+=", "punctuation"), ("\ufffd", "other"), ("a-b", "other"),
])
def test_piece_kind(piece, kind):
    assert piece_kind(piece) == kind


def test_token_kinds_with_specials_and_chat_template():
    tok = byte_tokenizer()
    ids = [tok.bos_token_id] + tok("Hi, 42 go!\n", add_special_tokens=False).input_ids
    assert token_kinds(tok, ids) == ["special", "word", "word", "punctuation", "whitespace", "digits", "digits",
                                     "whitespace", "word", "word", "punctuation", "newline"]
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>bot\n{% endif %}")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi 7"}], add_generation_prompt=True,
                                  return_dict=True)["input_ids"]
    kinds = token_kinds(tok, ids, template_mask(tok, "Hi 7", ids))
    assert kinds == ["special", *["template"] * 5, "word", "word", "whitespace", "digits",
                     "special", "template", "special", *["template"] * 4]


@pytest.fixture(scope="module")
def pyramid_stats(tiny_llama):
    model, tok = tiny_llama
    prompts = [_prompt(200, 1), _prompt(170, 2)]
    stats = eviction_stats(Engine(model, tok, config=SCHEDULE), prompts, make_policy("pyramidkv", keep_ratio=0.3),
                           age_edges=EDGES)
    return stats, prompts


def test_kept_fractions_match_the_engine(tiny_llama, pyramid_stats):
    model, tok = tiny_llama
    stats, prompts = pyramid_stats
    engine = Engine(model, tok, config=SCHEDULE)
    kept, seen = np.zeros(len(stats.layers)), 0
    for prompt in prompts:  # independently: the engine's own report of each layer's final cache
        out = engine.generate(prompt, max_new_tokens=1, policy=make_policy("pyramidkv", keep_ratio=0.3))
        assert out.report.tokens_seen == out.prompt_tokens == len(prompt)
        kept += out.report.final_len
        seen += out.report.tokens_seen
    assert stats.n_prompts == 2 and stats.tokens == 370 and stats.layers == [0, 1, 2]
    np.testing.assert_allclose(stats.by_layer(), kept / seen)
    assert stats.overall() == pytest.approx(kept.sum() / (3 * seen))
    # PyramidKV gives lower layers more room and ranks per KV head: tokens held by one head count half
    assert stats.by_layer()[0] > stats.by_layer()[1] > stats.by_layer()[2] and ((stats.kept % 1) == 0.5).any()


def test_kinds_and_age_buckets_add_up(pyramid_stats):
    stats, prompts = pyramid_stats
    kinds = [k for p in prompts for k in token_kinds(byte_tokenizer(), p.tolist())]
    assert stats.count.sum(axis=1).tolist() == [kinds.count(k) for k in stats.to_dict()["kinds"]]
    # ages 0-63, 64-127, 128+ of a 200- and a 170-token prompt
    assert stats.count.sum(axis=0).tolist() == [128, 128, 72 + 42]
    for table in (stats.by_kind(), stats.by_age()):
        shares = np.array([s for s, _ in table.values()])
        kept = np.nan_to_num([f for _, f in table.values()])
        assert shares.sum() == pytest.approx(1.0)
        assert (shares * kept).sum() == pytest.approx(stats.overall())
    weighted = (np.nan_to_num(stats.kind_by_layer()) * stats.count.sum(axis=1)[:, None]).sum(axis=0) / stats.tokens
    np.testing.assert_allclose(weighted, stats.by_layer())


def test_streaming_keeps_the_newest_and_drops_the_middle(tiny_llama):
    model, tok = tiny_llama
    # 4 sinks + the 64 newest tokens of a 300-token prompt, at the prompt-end eviction
    stats = eviction_stats(Engine(model, tok, config=SCHEDULE), [_prompt(300, 3)],
                           make_policy("streaming", budget=68), age_edges=EDGES)
    ages = stats.by_age()
    assert list(ages) == ["0-63", "64-127", "128+"]
    assert ages["0-63"][1] == 1.0 and ages["64-127"][1] == 0.0
    assert ages["128+"][1] == pytest.approx(4 / 172)  # the sinks only
    np.testing.assert_allclose(stats.by_layer(), 68 / 300)


def test_reports_are_written(pyramid_stats, tmp_path):
    stats, _ = pyramid_stats
    other = EvictionStats("full", stats.layers, EDGES, kept=stats.count[:, None, :].repeat(3, 1), count=stats.count)
    text = comparison_markdown([stats, other], header="# title\n")
    assert text.startswith("# title") and "| kind | share of tokens | pyramidkv | full |" in text
    assert "| 0-63 | 34.6% |" in text and "| all | 100.0% |" in text and "100.0% (1.00x)" in text
    assert "<summary>Kind x layer: full</summary>" in text
    assert stats.to_markdown().count("<details>") == 1
    assert json.loads(json.dumps(stats.to_dict()))["tokens"] == 370
    png = stats.plot(tmp_path / "one.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_benchmark_script_writes_the_comparison(tmp_path):
    vec = torch.zeros(4172)
    vec[-1], vec[-26 + 4] = -1.0, 1.5  # the NAMM test_inspect uses: keeps an age-dependent share
    NAMM(params=vec).save_pretrained(tmp_path / "namm")
    spec = importlib.util.spec_from_file_location("what_it_learned", ROOT / "benchmarks" / "what_it_learned.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--model", "tiny-llama", "--policies", "namm,streaming", "--namm", str(tmp_path / "namm"),
            "--tasks", "passkey", "--length", "300", "--limit", "1", "--keep-ratio", "0.3", "--chunk-size", "32",
            "--delay", "64", "--age-edges", "64,256", "--out", str(tmp_path / "out"), "--quiet"]
    assert script.main(argv) == 0
    text = (tmp_path / "out" / "learned.md").read_text(encoding="utf-8")
    assert "`python benchmarks/what_it_learned.py --model tiny-llama" in text
    data = json.loads((tmp_path / "out" / "learned.json").read_text(encoding="utf-8"))
    labels = [r["label"] for r in data["runs"]]  # the settings namm eval gives each policy
    assert labels[0].startswith("namm ") and labels[-1] == "streaming keep=0.3"
    assert "| kind | share of tokens | " + " | ".join(labels) + " |" in text
    assert data["conditions"]["delay"] == 64 and data["runs"][-1]["n_prompts"] == 1
    assert data["runs"][-1]["by_age"]["0-63"]["kept"] == 1.0  # StreamingLLM keeps the newest
    assert (tmp_path / "out" / "learned.png").stat().st_size > 10_000
    assert data["linear_readout"] is None and "weights" not in text  # a BAM has no readout

    from namm.memory import NAMMConfig

    linear = NAMMConfig(scorer={"kind": "mlp", "mlp_depth": 1}, features={"extras": ["attn_last"]})
    w = torch.zeros(27)
    w[-2] = 1.0  # score = attn_last, TOVA's rule per head
    NAMM(linear, w).save_pretrained(tmp_path / "linear")
    argv[argv.index("--namm") + 1], argv[argv.index("--out") + 1] = str(tmp_path / "linear"), str(tmp_path / "lin")
    assert script.main(argv) == 0
    data = json.loads((tmp_path / "lin" / "learned.json").read_text(encoding="utf-8"))
    assert data["linear_readout"]["weights"]["attn_last"] == 1.0
    assert "| attn_last | +1.000 |" in (tmp_path / "lin" / "learned.md").read_text(encoding="utf-8")


def test_linear_readout_names_each_weight_and_the_age_curve() -> None:
    import math

    from namm.analysis import input_names, linear_readout, linear_readout_markdown
    from namm.memory import NAMMConfig

    config = NAMMConfig(scorer={"kind": "mlp", "mlp_depth": 1}, features={"extras": ["key_norm", "attn_sum"]})
    n_in = config.features.feature_dim
    names = input_names(config.features)
    assert n_in == len(names) == 8 + 17 + 2
    assert names[0] == "age sin w0" and names[4] == "age cos w0" and names[8] == "spectrogram bin 0 (DC)"
    assert names[-2:] == ["key_norm", "attn_sum"]
    w = torch.zeros(n_in + 1, dtype=torch.float64)
    w[4] = 1.5  # age cos w0: frequency 1, so the age term is 1.5 cos(r)
    w[names.index("spectrogram bin 3")] = -0.25
    w[names.index("attn_sum")] = 2.0
    w[-1] = 7.0  # the bias
    namm = NAMM(config, w.float())
    readout = linear_readout(namm, ages=(0, 3, 10))
    assert readout["weights"]["attn_sum"] == pytest.approx(2.0)
    assert readout["weights"]["spectrogram bin 3"] == pytest.approx(-0.25)
    assert readout["bias"] == pytest.approx(7.0)
    assert list(readout["age_curve"]) == [0, 3, 10]
    for age, value in readout["age_curve"].items():
        assert value == pytest.approx(1.5 * math.cos(age), abs=1e-6)
    table = linear_readout_markdown(readout, top=2)
    assert table.splitlines()[2] == "| attn_sum | +2.000 |" and "17 more" in table
    with pytest.raises(ValueError, match="linear NAMM"):
        linear_readout(NAMM())
