"""The engine invariants of design.md, each checked with real numbers on tiny random models."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AttentionInterface

from namm.engine import Engine, EngineConfig
from namm.models import check_supported_config, load_model, tiny_model
from namm.policies.base import CacheSpec, MemoryPolicy

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3"]


class DropRandom(MemoryPolicy):
    """Test policy: keeps a seeded random 60% of each head's cache (different per layer and head)."""

    def __init__(self, needs_attention: bool = False, share: bool = False, seed: int = 0):
        self.needs_attention, self.share, self.seed = needs_attention, share, seed

    def reset(self, spec: CacheSpec) -> None:
        self.spec = spec
        self.gen = torch.Generator().manual_seed(self.seed)
        self.lens: dict[int, int] = {}
        self.attn_shapes: list[tuple[int, tuple[int, ...]]] = []
        self.shared_idx = None

    def observe(self, layer, attn, keys, positions):
        self.lens[layer] = positions.shape[1]
        if attn is not None:
            self.attn_shapes.append((layer, tuple(attn.shape)))
            assert torch.allclose(attn.sum(-1), torch.ones_like(attn.sum(-1)), atol=1e-5)

    def select(self, layer):
        n = self.lens[layer]
        keep = max(1, int(0.6 * n))
        if self.share:  # the same tokens in every layer and head
            if layer == self.spec.managed_layers[0]:  # a fresh draw per eviction step
                self.shared_idx = torch.randperm(n, generator=self.gen)[:keep].sort().values
            return self.shared_idx.expand(self.spec.kv_heads, keep).clone()
        rows = [torch.randperm(n, generator=self.gen)[:keep].sort().values for _ in range(self.spec.kv_heads)]
        return torch.stack(rows)


def run_with_logits(engine: Engine, policy, prompt: torch.Tensor, n_decode: int):
    """Prefill all logits + greedy decoding logits, and the final token sequence."""
    with engine.running():
        seq = engine.start(policy)
        logits = [seq.feed(prompt, all_logits=True, end_of_prompt=True)]
        tokens = prompt.tolist()
        for _ in range(n_decode):
            token = int(logits[-1][-1].argmax())
            tokens.append(token)
            logits.append(seq.feed(torch.tensor([token]), all_logits=True))
    return torch.cat(logits), torch.tensor(tokens), seq


def reference_masks(seq, spec: CacheSpec, n: int, window: int | None, sliding: set[int]):
    """Per layer, (kv_heads, n, n) bool: what each query may see given the eviction log."""
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    masks = {}
    for layer in range(spec.num_layers):
        if layer in sliding:
            dist = torch.arange(n)[:, None] - torch.arange(n)[None, :]
            masks[layer] = (causal & (dist < window)).expand(spec.kv_heads, n, n)
            continue
        mask = causal.expand(spec.kv_heads, n, n).clone()
        for step, kept in seq.eviction_log:
            if layer not in kept:
                continue
            alive = torch.zeros(spec.kv_heads, n, dtype=torch.bool)
            alive.scatter_(1, kept[layer], True)
            alive[:, step:] = True
            mask[:, step:, :] &= alive[:, None, :]  # queries after the step lose the dropped keys
        masks[layer] = mask
    return masks


def masked_reference_logits(model, tokens: torch.Tensor, masks: dict[int, torch.Tensor]) -> torch.Tensor:
    """Full forward without any cache, each layer and head hiding the keys its mask hides."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        mask = masks[module.layer_idx].repeat_interleave(groups, dim=0)[None]
        scores = (query @ key.repeat_interleave(groups, 1).transpose(-1, -2)) * scaling
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        return (probs @ value.repeat_interleave(groups, 1)).transpose(1, 2).contiguous(), None

    AttentionInterface.register("namm_test_reference", attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation("namm_test_reference")
    try:
        with torch.no_grad():
            return model(tokens[None], use_cache=False).logits[0]
    finally:
        model.set_attn_implementation(previous)


# 1. keep-all is exact -------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_keep_all_logits_equal_plain_forward(arch):
    model, _ = tiny_model(arch, seed=1)
    prompt = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(prompt[None]).logits[0]
    engine = Engine(model, chunk_size=32, delay=64)
    with engine.running():
        got = engine.start().feed(prompt, all_logits=True)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_keep_all_greedy_equals_model_generate(arch):
    model, tok = tiny_model(arch, seed=2)
    prompt = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(1))
    expected = model.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False)[0, 200:].tolist()
    out = Engine(model, tok, chunk_size=64, delay=128).generate(prompt, max_new_tokens=40)
    eos = 257
    expected = expected[: expected.index(eos)] if eos in expected else expected
    assert out.token_ids == expected
    assert out.report.kept_fraction == 1.0


# 2. eviction is masking (fp64), during prefill and decoding -----------------------------------
@pytest.mark.parametrize("arch,needs_attention", [("llama", False), ("llama", True), ("gemma3", True), ("qwen3", False)])
def test_eviction_equals_attention_mask(arch, needs_attention):
    model, _ = tiny_model(arch, seed=3, dtype=torch.float64)
    prompt = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(2))
    engine = Engine(model, config=EngineConfig(chunk_size=32, delay=64, record_evictions=True))
    logits, tokens, seq = run_with_logits(engine, DropRandom(needs_attention), prompt, n_decode=70)
    steps = [s for s, _ in seq.eviction_log]
    assert steps == [64, 128, 192, 200, 256]  # prefill grid, end of prompt, then during decoding
    spec = seq.spec
    sliding = set(range(spec.num_layers)) - set(spec.managed_layers)
    window = getattr(model.config, "sliding_window", None)
    ref = masked_reference_logits(model, tokens, reference_masks(seq, spec, tokens.numel(), window, sliding))
    assert (logits - ref).abs().max().item() < 1e-6
    # and it is not trivially equal: the unmasked model differs
    with torch.no_grad():
        plain = model(tokens[None]).logits[0]
    assert (plain[128:] - ref[128:]).abs().max().item() > 1e-3


def test_eviction_equals_standard_4d_mask(tiny_llama):
    """Same tokens dropped everywhere: the plain transformers forward with a 4-D float mask agrees."""
    model, _ = tiny_model("llama", seed=4, dtype=torch.float64)
    prompt = torch.randint(0, 256, (160,), generator=torch.Generator().manual_seed(3))
    engine = Engine(model, config=EngineConfig(chunk_size=16, delay=32, record_evictions=True))
    logits, tokens, seq = run_with_logits(engine, DropRandom(share=True), prompt, n_decode=40)
    spec = seq.spec
    visible = reference_masks(seq, spec, tokens.numel(), None, set())[0][0]
    mask4d = torch.zeros(1, 1, *visible.shape, dtype=torch.float64).masked_fill(~visible, torch.finfo(torch.float64).min)
    with torch.no_grad():
        ref = model(tokens[None], attention_mask=mask4d).logits[0]
    assert (logits - ref).abs().max().item() < 1e-6


# 3. positions stay absolute --------------------------------------------------------------------
def test_positions_stay_absolute_after_pruning():
    model, _ = tiny_model("llama", seed=5)
    seen_positions = []
    handle = model.model.rotary_emb.register_forward_hook(
        lambda m, args, kwargs, out: seen_positions.append(kwargs.get("position_ids", args[-1]).clone()), with_kwargs=True
    )
    engine = Engine(model, config=EngineConfig(chunk_size=32, delay=64, record_evictions=True))
    prompt = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(4))
    _, _, seq = run_with_logits(engine, DropRandom(), prompt, n_decode=10)
    handle.remove()
    flat = torch.cat([p.reshape(-1) for p in seen_positions])
    assert flat.tolist() == list(range(160))  # never the compacted cache length
    assert seq.cache.layers[0].keys.shape[2] < 100
    # cached positions have gaps but stay sorted and absolute
    pos = seq.positions[0]
    assert pos[:, -1].tolist() == [159, 159]
    assert bool((pos[:, 1:] > pos[:, :-1]).all())


# 4. memory is really freed ---------------------------------------------------------------------
def test_cache_tensors_really_shrink():
    model, _ = tiny_model("llama", seed=6)
    engine = Engine(model, config=EngineConfig(chunk_size=32, delay=64))
    with engine.running():
        seq = engine.start(DropRandom())
        seq.feed(torch.randint(0, 256, (128,)))
    spec = seq.spec
    # 64 -> keep 38; +64 = 102 -> keep 61
    for layer in spec.managed_layers:
        keys, values = seq.cache.layers[layer].keys, seq.cache.layers[layer].values
        assert keys.shape == (1, spec.kv_heads, 61, spec.head_dim)
        assert values.shape == keys.shape
        assert keys.is_contiguous() or keys.storage().size() >= keys.numel()
    report = seq.report()
    assert report.final_len == [61] * spec.num_layers
    assert report.peak_len == [102] * spec.num_layers
    assert report.kv_bytes == 61 * 3 * spec.kv_heads * spec.head_dim * 2 * 4
    assert report.kv_bytes_full == 128 * 3 * spec.kv_heads * spec.head_dim * 2 * 4
    assert report.kept_fraction == pytest.approx(61 / 128)


# 5./6. schedule and one layer at a time ----------------------------------------------------------
def test_policy_sees_one_layer_chunk_at_a_time():
    model, _ = tiny_model("llama", seed=7)
    policy = DropRandom(needs_attention=True)
    engine = Engine(model, config=EngineConfig(chunk_size=32, delay=64, evict_at_prefill_end=False))
    with engine.running():
        seq = engine.start(policy)
        seq.feed(torch.randint(0, 256, (96,)))
        seq.feed(torch.tensor([5]))
    layers = [layer for layer, _ in policy.attn_shapes]
    assert layers == [0, 1, 2] * 4  # 3 chunks of 32 + one decoded token, layer by layer
    assert policy.attn_shapes[0][1] == (2, 32, 32)
    assert policy.attn_shapes[3][1] == (2, 32, 64)
    assert policy.attn_shapes[6][1] == (2, 32, 38 + 32)  # after the eviction at 64 tokens
    assert policy.attn_shapes[9][1] == (2, 1, 38 + 32 + 1)


def test_begin_eviction_once_per_step_before_select():
    calls = []

    class Recording(DropRandom):
        def begin_eviction(self):
            calls.append("begin")

        def select(self, layer):
            calls.append(layer)
            return super().select(layer)

    model, _ = tiny_model("llama", seed=7)
    engine = Engine(model, config=EngineConfig(chunk_size=32, delay=64))
    with engine.running():
        engine.start(Recording()).feed(torch.randint(0, 256, (150,)), end_of_prompt=True)
    assert calls == ["begin", 0, 1, 2] * 3  # steps at 64, 128 and the prompt end (150)


def test_chunks_split_on_delay_grid():
    model, _ = tiny_model("llama", seed=8)
    engine = Engine(model, config=EngineConfig(chunk_size=48, delay=64, record_evictions=True))
    with engine.running():
        seq = engine.start(DropRandom())
        seq.feed(torch.randint(0, 256, (200,)), end_of_prompt=True)
    assert [s for s, _ in seq.eviction_log] == [64, 128, 192, 200]


def test_one_shot_prompt_compression():
    model, _ = tiny_model("llama", seed=8)
    config = EngineConfig(chunk_size=48, delay=64, evict_during_prefill=False, record_evictions=True)
    engine = Engine(model, config=config)
    with engine.running():
        seq = engine.start(DropRandom())
        seq.feed(torch.randint(0, 256, (200,)), end_of_prompt=True)
        assert seq.report().peak_len == [200] * 3  # the whole prompt was cached before pruning
        for token in range(60):  # decoding still evicts on the grid: at 256
            seq.feed(torch.tensor([token]))
    assert [s for s, _ in seq.eviction_log] == [200, 256]


# 7. sliding-window layers keep their own window ----------------------------------------------------
def test_gemma_sliding_layers_untouched():
    model, _ = tiny_model("gemma3", seed=9)
    engine = Engine(model, config=EngineConfig(chunk_size=32, delay=64))
    with engine.running():
        seq = engine.start(DropRandom(needs_attention=True))
        seq.feed(torch.randint(0, 256, (200,)), end_of_prompt=True)
    spec = seq.spec
    assert spec.managed_layers == (2,)
    assert {layer for layer, _ in seq.policy.attn_shapes} == {2}
    window = model.config.sliding_window
    for layer in (0, 1, 3):
        assert seq.cache.layers[layer].keys.shape[2] == window - 1
    assert seq.cache.layers[2].keys.shape[2] == seq.positions[2].shape[1] < 200


# bad inputs -----------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(tiny_llama):
    model, tok = tiny_llama
    engine = Engine(model, tok)
    with pytest.raises(ValueError, match="empty"):
        engine.generate("   ")
    with pytest.raises(ValueError, match="empty"):
        engine.generate([])
    with pytest.raises(ValueError, match="maximum length"):
        engine.generate(torch.zeros(4090, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate("hi", max_new_tokens=0)
    with pytest.raises(ValueError, match="positive"):
        EngineConfig(delay=0)
    with pytest.raises(FileNotFoundError, match="offline models"):
        load_model("no-such-org/no-such-model-xyz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("./missing/model/folder")


def test_unsupported_model_is_refused():
    from transformers import GPT2Config, T5Config

    with pytest.raises(ValueError, match="not supported"):
        check_supported_config(GPT2Config())
    with pytest.raises(ValueError, match="encoder-decoder"):
        check_supported_config(T5Config())


def test_bad_policy_indices_are_reported(tiny_llama):
    model, _ = tiny_llama

    class Broken(DropRandom):
        def select(self, layer):
            return torch.tensor([[3, 1], [0, 2]])

    engine = Engine(model, chunk_size=32, delay=32)
    with pytest.raises(RuntimeError, match="ascending"):
        with engine.running():
            engine.start(Broken()).feed(torch.randint(0, 256, (40,)))


def test_sampling_is_seeded_and_stops(tiny_llama):
    model, tok = tiny_llama
    engine = Engine(model, tok, chunk_size=32, delay=64)
    a = engine.generate("hello there", max_new_tokens=30, do_sample=True, temperature=1.5, top_p=0.9, seed=3)
    b = engine.generate("hello there", max_new_tokens=30, do_sample=True, temperature=1.5, top_p=0.9, seed=3)
    c = engine.generate("hello there", max_new_tokens=30, do_sample=True, temperature=1.5, top_p=0.9, seed=4)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    greedy = engine.generate("hello there", max_new_tokens=30)
    stop = greedy.text[5:7]
    stopped = engine.generate("hello there", max_new_tokens=30, stop=[stop])
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert greedy.text.startswith(stopped.text)


def test_loglikelihood_matches_plain_forward(tiny_llama):
    model, _ = tiny_llama
    ctx = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(5))
    cont = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(6))
    full = torch.cat([ctx, cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(full[None]).logits[0].double(), -1)
    expected = logp[99:119].gather(1, cont[:, None]).sum().item()
    got = Engine(model, chunk_size=32, delay=64).loglikelihood(ctx, cont)
    assert got == pytest.approx(expected, abs=1e-3)
    evicting = Engine(model, chunk_size=32, delay=64).loglikelihood(ctx, cont, policy=DropRandom())
    assert abs(evicting - expected) > 1e-3


def test_answer_margins_match_plain_forward(tiny_llama):
    model, _ = tiny_llama
    ctx = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(5))
    cont = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(6))
    forward = lambda: torch.log_softmax(model(torch.cat([ctx, cont])[None]).logits[0].double(), -1)[99:119]  # noqa: E731
    with torch.no_grad():
        cont[3] = int(forward()[3].argmax())  # one answer token the model's argmax: a positive margin
        logp = forward()
    ref = logp.gather(1, cont[:, None])[:, 0]
    top2 = logp.topk(2, dim=1).values
    expected = [float(r - (t[1] if r == t[0] else t[0])) for r, t in zip(ref, top2)]
    engine = Engine(model, chunk_size=32, delay=64)
    margins, loglik, report = engine.answer_margins(ctx, cont)
    assert margins == pytest.approx(expected, abs=1e-3)
    assert margins[3] > 0
    assert loglik == pytest.approx(engine.loglikelihood(ctx, cont), abs=1e-6)
    assert report.kept_fraction == 1.0
    evicting, evicting_ll, evicting_report = engine.answer_margins(ctx, cont, policy=DropRandom())
    assert evicting_ll == pytest.approx(engine.loglikelihood(ctx, cont, policy=DropRandom()), abs=1e-6)
    assert evicting_report.kept_fraction < 1.0 and max(abs(a - b) for a, b in zip(evicting, margins)) > 1e-3


@pytest.mark.parametrize("native", [False, True])
def test_bfloat16_on_a_cpu_that_emulates_it_warns(monkeypatch, caplog, native):
    """bfloat16 on a CPU without AVX512-BF16 / AMX is slower than float32: loading a model so says
    what to do; float32, a CUDA device or a CPU with the instructions get no warning."""
    import namm.models as models

    assert isinstance(models.cpu_has_native_bf16(), bool)  # this machine's answer, before the patch
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level(logging.WARNING, logger="namm.models"):
        model, _ = load_model("tiny-llama", dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16
    warned = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
    assert bool(warned) is not native
    if warned:
        assert "float32" in warned[0]
    assert not models.warn_if_emulated_bf16(torch.float32, torch.device("cpu"))
    assert not models.warn_if_emulated_bf16(torch.bfloat16, torch.device("cuda"))
