"""LoRA slots keep a second copy of their factors in the prompt chunks' dtype where decode's
differs (AMX: float32 decode GEMMs, bf16 prompt GEMMs): loads and clears reach both."""

from __future__ import annotations

import torch

from server.engine.lora import AdapterWeights, LoraSlots
from server.engine.lora_apply import add_adapters

SHAPES = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32)}
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",)}


def test_prompt_chunks_read_the_same_factors_in_their_own_dtype():
    slots = LoraSlots(
        2, SHAPES, 2, 4, torch.float32, "cpu", groups=GROUPS, prompt_dtype=torch.bfloat16
    )
    generator = torch.Generator().manual_seed(0)
    factors = {
        (layer, module): (
            torch.randn(4, fan_in, generator=generator).bfloat16(),
            torch.randn(fan_out, 4, generator=generator).bfloat16(),
        )
        for layer in range(2)
        for module, (fan_in, fan_out) in SHAPES.items()
    }
    slots.load(1, AdapterWeights("a@1", 4, factors))
    rows = torch.tensor([1, -1, 1])
    prompt, decode = slots.batch(rows).layer(1), slots.batch(rows, decode=True).layer(1)
    for group in GROUPS:
        assert prompt.lora[group].a.dtype == torch.bfloat16
        assert decode.lora[group].a.dtype == torch.float32
        assert torch.equal(prompt.lora[group].a.float(), decode.lora[group].a)  # bf16 values
        assert torch.equal(prompt.lora[group].b.float(), decode.lora[group].b)
    assert prompt.lora["qkv"].mask.dtype == torch.bfloat16
    x = torch.randn(3, 32, generator=generator)
    out = torch.zeros(3, 64)
    expected = add_adapters(decode, "qkv", x, out)
    got = add_adapters(prompt, "qkv", x.bfloat16(), out.bfloat16())
    torch.testing.assert_close(got.float(), expected, rtol=0.03, atol=0.05)
    assert torch.equal(expected[1], torch.zeros(64))  # the base-model row gets nothing
    slots.clear(1)
    assert all(not t.any() for t in (*slots.prompt_a.values(), *slots.prompt_b.values()))
    float32 = sum(t.nbytes for t in (*slots.a.values(), *slots.b.values()))
    assert slots.nbytes == float32 + float32 // 2  # and the bf16 copies
