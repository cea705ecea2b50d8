"""KVzip's repeat pass: the official prompt format, and a side forward that leaves no trace."""

from __future__ import annotations

import pytest
import torch

from namm.engine import Engine, EngineConfig
from namm.models import byte_tokenizer, tiny_model
from namm.policies import MemoryPolicy, make_policy
from namm.policies.kvzip import repeat_suffix


def test_repeat_inputs_follow_the_official_format() -> None:
    tok = byte_tokenizer()
    text = "The cat sat on the mat. The dog ate the bone. A bird sang."
    ids = torch.tensor(tok.encode(text, add_special_tokens=False))
    positions = torch.arange(ids.numel()) + 7
    policy = make_policy("kvzip", budget=8, chunk_size=20)
    inputs = policy.repeat_inputs(ids, positions, tok)
    assert len(inputs) == 3
    texts = [tok.decode(repeat) for repeat, _, _ in inputs]
    assert texts[0] == "\n\nRepeat the previous context exactly.\n" + text[:20]
    assert texts[1] == "\n\nRepeat the part of the previous context exactly, starting with " + text[12:20] + "\n" + text[20:40]
    assert texts[2] == "\n\nRepeat the part of the previous context exactly, starting with " + text[32:40] + "\n" + text[40:]
    assert [(first, last) for _, first, last in inputs] == [(7, 26), (27, 46), (47, ids.numel() + 6)]


def test_repeat_suffix_is_the_assistant_turn_of_the_chat_template() -> None:
    tok = byte_tokenizer()
    assert repeat_suffix(tok) == "\n"
    tok.chat_template = ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert repeat_suffix(tok) == "<|end|><|assistant|>"


class Replay(MemoryPolicy):
    """Keeps, at the i-th eviction step, the absolute positions another run kept there."""

    def __init__(self, log):
        self.log, self.step = log, 0

    def reset(self, spec):
        self.spec, self.positions = spec, {}

    def observe(self, layer, attn, keys, positions):
        self.positions[layer] = positions

    def select(self, layer):
        kept = self.log[self.step][1][layer]
        if layer == self.spec.managed_layers[-1]:
            self.step += 1
        held = self.positions[layer]
        return torch.stack([torch.searchsorted(held[h], kept[h]) for h in range(held.shape[0])])


def run(engine: Engine, policy, prompt: torch.Tensor, decoded: torch.Tensor):
    with engine.running():
        seq = engine.start(policy)
        logits = [seq.feed(prompt, all_logits=True, end_of_prompt=True)]
        for token in decoded:
            logits.append(seq.feed(token[None], all_logits=True))
    return torch.cat(logits), seq


@pytest.mark.parametrize("arch, every_step", [("llama", True), ("llama", False), ("gemma3", True)])
def test_repeat_pass_leaves_no_trace(arch: str, every_step: bool) -> None:
    """The cache (sliding-window layers included), logits and report after KVzip's eviction steps
    equal those of selecting the same indices without a repeat pass."""
    model, tok = tiny_model(arch, seed=0)
    engine = Engine(model, tok, config=EngineConfig(chunk_size=32, delay=64, record_evictions=True))
    gen = torch.Generator().manual_seed(1)
    prompt, decoded = torch.randint(0, 256, (150,), generator=gen), torch.randint(0, 256, (50,), generator=gen)
    logits, seq = run(engine, make_policy("kvzip", budget=40, chunk_size=48, every_step=every_step), prompt, decoded)
    replayed, plain = run(engine, Replay(seq.eviction_log), prompt, decoded)
    assert seq.side_tokens > 0 and plain.side_tokens == 0
    assert [seen for seen, _ in seq.eviction_log] == [64, 128, 150, 192]
    assert [seen for seen, _ in plain.eviction_log] == [64, 128, 150, 192]
    for (_, a), (_, b) in zip(seq.eviction_log, plain.eviction_log):
        assert all(torch.equal(a[layer], b[layer]) for layer in a)
    assert torch.equal(logits, replayed)
    for a, b in zip(seq.cache.layers, plain.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert seq.positions.keys() == plain.positions.keys()
    assert all(torch.equal(seq.positions[layer], plain.positions[layer]) for layer in seq.positions)
    assert seq.seen == plain.seen == 200
    assert seq.report() == plain.report()
