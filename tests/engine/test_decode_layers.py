"""A decode step's layers in one kernel call (engine/decode_layers.py) give the bits of the
layer-by-layer route: its GLU against torch's ops, and whole steps (logits, bit for bit) of
every family's tiny model with base and LoRA rows mixed, and of the bundled models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ragtune.config import EngineConfig, ModelConfig, default_home
from ragtune.models import LoadedModel, load_base_model
from server.adapters.loader import BaseSpec, read_adapter
from server.engine import decode_layers, native
from server.engine.runner import CompactRunner, build_runner
from tests.engine.families import FAMILY_NAMES, WINDOW, peft_adapter, tiny_model
from tests.engine.test_runner import sequence

pytestmark = pytest.mark.skipif(
    native.unavailable_reason() is not None or not native.library().decode_layers_supported(),
    reason="ragtune's kernels or AVX-512 are not available here",
)

ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def kernel_route_here() -> bool:
    from ragtune.hardware import detect

    return "avx512f" in detect().features


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_glu_is_torchs_activation_times_up_bit_for_bit(name):
    activation = ACTIVATIONS[name]
    table = decode_layers.activation_table(activation)
    generator = torch.Generator().manual_seed(1)
    every_code = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    gates = every_code[::22][: 9 * 320].view(9, 320)  # spread over every code: inf, NaN too
    ups = (torch.randn(9, 320, generator=generator) * 6).bfloat16()
    gate_up = torch.cat((gates, ups), dim=1)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = activation(gate) * up
    got = decode_layers.glu(native.library(), table, gate_up)
    assert torch.equal(expected.view(torch.int16), got.view(torch.int16))
    decode_layers.check_glu(native.library(), table, activation, 320)  # the load-time check


def decode_logits(runner: CompactRunner, jobs, steps: int) -> list[torch.Tensor]:
    """Each decode step's logits after every prompt's prefill (greedy)."""
    seqs = [sequence(prompt, adapter) for prompt, adapter in jobs]
    for seq in seqs:
        runner.add(seq)
        while (logits := runner.prefill([seq])[0]) is None:
            pass
        seq.output_ids.append(int(logits.argmax()))
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = runner.decode(seqs)
            out.append(logits.clone())
            for seq, row in zip(seqs, logits, strict=True):
                seq.output_ids.append(int(row.argmax()))
    return out


def assert_same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32)), f"step {step}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_one_call_gives_every_familys_layer_by_layer_bits(family, tmp_path):
    """bf16 compute, w4a8 weights: base and LoRA rows of lengths past the sliding window,
    decoding past it, one call or layer by layer: the same logits (Qwen2's q/k/v biases and
    Gemma 2's soft-capped attention keep it layer by layer, and it says so)."""
    model = tiny_model(family).to(torch.bfloat16)
    loaded = LoadedModel(model, None, None, "f" * 64, "cpu", torch.bfloat16, "none")

    def runner(kind: str) -> CompactRunner:
        config = EngineConfig(
            max_batch_size=4, max_loras=2, max_lora_rank=8, weights="w4a8", decode_layers=kind
        )
        built = build_runner(loaded, config, max_seq_len=128)
        assert isinstance(built, CompactRunner)
        return built

    python = runner("python")
    reason = decode_layers.unsupported_reason(python.model)
    if family in ("qwen2", "gemma2"):
        expected = "biases" if family == "qwen2" else "decode attention is not on its kernel"
        assert reason is not None and expected in reason
        if family == "gemma2":
            assert python.kernels()["decode_attention"] == "torch"
            assert python.kernels()["prompt_attention"] == "torch"
        with pytest.raises(ValueError, match="decode_layers=kernel cannot run here"):
            runner("kernel")
        return
    if not kernel_route_here():
        pytest.skip(reason or "no AVX-512 here")
    fused = runner("kernel")
    assert fused.kernels()["decode_layers"] == "kernel"
    assert python.kernels()["decode_layers"] == "python"
    spec = BaseSpec("f" * 64, 2, python.module_shapes, 8, torch.bfloat16)
    peft_adapter(tiny_model(family), family, tmp_path / "a")
    adapter = read_adapter(tmp_path / "a", "a", None, spec, 0).weights
    prompts = [list(range(3, 3 + 3 * WINDOW)), [5, 9, 2, 77, 4], [100, 7] * (2 * WINDOW)]
    jobs = [(prompts[0], adapter), (prompts[1], None), (prompts[2], adapter)]
    steps = 2 * WINDOW
    assert_same_bits(decode_logits(python, jobs, steps), decode_logits(fused, jobs, steps))
    # a lone row (one-row kernels) and base rows only (no LoRA tables)
    assert_same_bits(
        decode_logits(runner("python"), jobs[:1], steps),
        decode_logits(runner("kernel"), jobs[:1], steps),
    )
    base = [(p, None) for p, _ in jobs]
    assert_same_bits(
        decode_logits(runner("python"), base, steps), decode_logits(runner("kernel"), base, steps)
    )


def test_a_slot_reloaded_with_another_adapter_takes_its_groups(tmp_path):
    """The kernel's LoRA tables are kept while the same slots are in use: a slot that gets an
    adapter over more projections than the one before (attention only, then every
    projection) must take the new groups, as layer by layer does."""
    if not kernel_route_here():
        pytest.skip("no AVX-512 here")
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama").to(torch.bfloat16)
    loaded = LoadedModel(model, None, None, "f" * 64, "cpu", torch.bfloat16, "none")
    config = dict(max_batch_size=2, max_loras=1, max_lora_rank=8, weights="w4a8")
    python = build_runner(loaded, EngineConfig(**config, decode_layers="python"), 128)
    fused = build_runner(loaded, EngineConfig(**config, decode_layers="kernel"), 128)
    spec = BaseSpec("f" * 64, 2, python.module_shapes, 8, torch.bfloat16)
    torch.manual_seed(3)
    attention_only = LoraConfig(
        r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    get_peft_model(copy.deepcopy(tiny_model("llama")), attention_only).save_pretrained(
        tmp_path / "attention"
    )
    peft_adapter(tiny_model("llama"), "llama", tmp_path / "all")
    first = read_adapter(tmp_path / "attention", "attention", None, spec, 0).weights
    second = read_adapter(tmp_path / "all", "all", None, spec, 0).weights
    prompt = [5, 9, 2, 77, 4, 8]
    for adapter in (first, second):  # one slot: the second replaces the first
        assert_same_bits(
            decode_logits(python, [(prompt, adapter)], 4),
            decode_logits(fused, [(prompt, adapter)], 4),
        )
        for runner in (python, fused):
            for seq in list(runner.slots):
                runner.release(seq)


@pytest.mark.parametrize(
    "source", ["bundled", pytest.param("bundled:gemma-3-270m", marks=pytest.mark.slow)]
)
def test_the_bundled_models_decode_the_same_bits_in_one_call(source):
    """The real models as served (their auto weights and dtype): 16 rows of different
    lengths, half on a random rank-16 adapter on every projection, 24 steps."""
    if not kernel_route_here():
        pytest.skip("the one-call route needs AVX-512 here")
    loaded = load_base_model(
        ModelConfig(source=source), default_home(), packs_projections=True
    )  # as served
    if loaded.dtype is not torch.bfloat16:
        pytest.skip("this CPU computes in float32: the one-call route is for bf16")

    def runner(kind: str) -> CompactRunner:
        config = EngineConfig(max_batch_size=16, decode_layers=kind)
        return CompactRunner(loaded, config, max_seq_len=512)

    python = runner("python")
    generator = torch.Generator().manual_seed(0)
    factors = {
        (layer, module): (
            torch.randn(16, fan_in, generator=generator) * 0.02,
            torch.randn(fan_out, 16, generator=generator) * 0.02,
        )
        for layer in range(python.model.num_layers)
        for module, (fan_in, fan_out) in python.module_shapes.items()
    }
    from server.engine.lora import AdapterWeights

    adapter = AdapterWeights("random@1", 16, factors)
    jobs = [
        ([100 + (t * 7 + i) % 1000 for t in range(12 + 5 * i)], adapter if i % 2 else None)
        for i in range(16)
    ]
    fused = runner("kernel")
    assert fused.kernels()["decode_layers"] == "kernel"
    assert_same_bits(decode_logits(python, jobs, 24), decode_logits(fused, jobs, 24))


def test_float32_compute_runs_layer_by_layer_and_says_why():
    model = copy.deepcopy(tiny_model("llama"))
    loaded = LoadedModel(model, None, None, "f" * 64, "cpu", torch.float32, "none")
    config = EngineConfig(max_batch_size=2, weights="w4a8")
    runner = CompactRunner(loaded, config, max_seq_len=64)
    assert runner.kernels()["decode_layers"] == "python"
    assert "bf16" in decode_layers.unsupported_reason(runner.model)
    with pytest.raises(ValueError, match="decode_layers=kernel cannot run here"):
        config = EngineConfig(max_batch_size=2, weights="w4a8", decode_layers="kernel")
        CompactRunner(loaded, config, max_seq_len=64)
