"""namm.attach: a memory policy inside stock ``model.generate`` and ``pipeline``, on tiny models."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, pipeline

from namm import Engine, NAMM, attach, make_policy
from namm.models import tiny_model
from namm.policies.namm import NAMMPolicy

SCHEDULE = dict(chunk_size=32, delay=48)
N_PROMPT, N_NEW = 150, 24


def prompt_ids(n: int = N_PROMPT, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def recency_namm() -> NAMM:
    """A NAMM whose score is -1 + 1.5 cos(age * w_0): it keeps the tokens whose cos(age) >= 2/3."""
    vec = torch.zeros(4172)
    vec[-1], vec[-26 + 4] = -1.0, 1.5  # b3; w3 on the cos(age * w_0) recency feature
    return NAMM(params=vec)


def until_eos(tokens: list[int], eos: int = 257) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


@pytest.mark.parametrize("name", ["h2o", "namm"])
def test_generate_tokens_equal_engine(tiny_llama, name):
    model, tok = tiny_llama
    policy = make_policy("h2o", keep_ratio=0.3) if name == "h2o" else NAMMPolicy(recency_namm())
    ids = prompt_ids()
    ref = Engine(model, tok, policy=policy, **SCHEDULE).generate(ids, max_new_tokens=N_NEW)
    with attach(model, policy, **SCHEDULE) as memory:
        out = model.generate(ids, max_new_tokens=N_NEW, do_sample=False)
    assert until_eos(out[0, N_PROMPT:].tolist()) == ref.token_ids
    report = memory.report()
    assert report.evictions == ref.report.evictions >= 4  # 48, 96, 144, prompt end (150), ...
    assert report.final_len == ref.report.final_len and report.kept_fraction < 0.6
    assert memory.reports == [report]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_keep_all_equals_plain_generate(arch):
    model, _ = tiny_model(arch, seed=2)
    ids = prompt_ids(120, seed=3)
    plain = model.generate(ids, max_new_tokens=N_NEW, do_sample=False)
    if arch == "gemma3":  # a checkpoint's default static cache gives way to the DynamicCache namm prunes
        model.generation_config.cache_implementation = "static"
    with attach(model, **SCHEDULE) as memory:
        got = model.generate(ids, max_new_tokens=N_NEW, do_sample=False)
    assert got.tolist() == plain.tolist()
    assert memory.report().kept_fraction == 1.0
    assert model.config._attn_implementation == "sdpa" and "forward" not in model.__dict__  # detached


def test_positions_stay_absolute_and_generate_cache_shrinks(tiny_llama):
    model, _ = tiny_llama
    seen = []
    handle = model.model.rotary_emb.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(kwargs.get("position_ids", args[-1]).clone()), with_kwargs=True)
    cache = DynamicCache(config=model.config)
    try:
        with attach(model, make_policy("streaming", budget=40), **SCHEDULE) as memory:
            out = model.generate(prompt_ids(), max_new_tokens=10, do_sample=False, past_key_values=cache,
                                 return_dict_in_generate=True)
    finally:
        handle.remove()
    assert torch.cat([p.reshape(-1) for p in seen]).tolist() == list(range(N_PROMPT + 9))
    returned = getattr(out, "cache", None) or out.past_key_values
    assert returned is cache is memory.sequence.cache
    # evicted to 40 at the prompt end (150), then 9 decoded tokens: 49 keys, the newest at 158
    assert [layer.keys.shape[2] for layer in cache.layers] == [49, 49, 49]
    assert memory.sequence.positions[0][:, -1].tolist() == [158, 158]


def test_sampling_is_seeded_and_respects_the_budget(tiny_llama):
    model, _ = tiny_llama
    ids = prompt_ids()

    def sample(seed: int):
        torch.manual_seed(seed)
        out = model.generate(ids, max_new_tokens=N_NEW, do_sample=True, temperature=1.5, top_p=0.9)
        return out[0, N_PROMPT:].tolist(), memory.report()

    with attach(model, make_policy("streaming", budget=40), **SCHEDULE) as memory:
        (a, report), (b, _), (c, _) = sample(0), sample(0), sample(1)
    assert a == b and a != c
    # evictions at 48, 96, 144 and the prompt end (150) keep 40; 23 tokens are fed after it
    assert report.tokens_seen == N_PROMPT + N_NEW - 1 == 173
    assert report.evictions == 4
    assert report.final_len == [40 + 23] * 3
    assert report.peak_len == [40 + 48] * 3  # just before the eviction at 144


def test_pipeline_text_generation(tiny_llama):
    model, tok = tiny_llama
    text = "the quick brown fox jumps over the lazy dog " * 4
    policy = make_policy("h2o", budget=64)
    ref = Engine(model, tok, policy=policy, **SCHEDULE).generate(text, max_new_tokens=16, chat=False)
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    with attach(model, policy, **SCHEDULE) as memory:
        res = pipe([text, text[:100]], max_new_tokens=16, do_sample=False, return_tensors=True)
    ids = res[0][0]["generated_token_ids"]
    assert until_eos(ids[len(text):]) == ref.token_ids
    assert len(memory.reports) == 2 and memory.reports[0].final_len == ref.report.final_len


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_beams=2), "num_beams"),
    (dict(num_return_sequences=2, do_sample=True), "num_return_sequences"),
    (dict(prefill_chunk_size=16), "prefill_chunk_size"),
    (dict(use_cache=False), "use_cache"),
])
def test_unsupported_generate_options_are_clear_errors(tiny_llama, kwargs, message):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match=message), attach(model, make_policy("l2", budget=32)):
        model.generate(prompt_ids(40), max_new_tokens=3, **kwargs)
    assert "generate" not in model.__dict__  # restored after the error


def test_batches_and_padding_are_clear_errors(tiny_llama):
    model, _ = tiny_llama
    with attach(model):
        with pytest.raises(ValueError, match="batch size 1"):
            model.generate(torch.zeros(2, 10, dtype=torch.long), max_new_tokens=3)
        with pytest.raises(ValueError, match="unpadded"):
            model.generate(torch.ones(1, 10, dtype=torch.long), attention_mask=torch.tensor([[0] + [1] * 9]),
                           max_new_tokens=3)
        with pytest.raises(RuntimeError, match="already"):
            attach(model).__enter__()
        with pytest.raises(ValueError, match="empty cache"):
            cache = DynamicCache(config=model.config)
            model(prompt_ids(8), past_key_values=cache)
            model.generate(prompt_ids(8), past_key_values=cache, max_new_tokens=2)
