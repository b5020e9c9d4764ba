"""The compact forward, KV slots and batched LoRA against Hugging Face and PEFT, on a tiny
random Llama (fast and exact in fp32); the real model is covered over HTTP elsewhere."""

from __future__ import annotations

import pytest
import torch

from ragtune.config import EngineConfig
from ragtune.models.loader import LoadedModel
from server.adapters.loader import BaseSpec, read_adapter
from server.engine import native
from server.engine.kernel_choice import decode_weights
from server.engine.models.attention import plan_decode
from server.engine.models.exactness import PaddedExtents, padded_extents_exact
from server.engine.runner import CompactRunner
from server.engine.sequence import Sequence
from server.engine.types import GenerationRequest, SamplingParams

VOCAB = 128


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(
        model=model,
        tokenizer=None,
        model_dir=None,
        fingerprint="f" * 64,
        device="cpu",
        dtype=torch.float32,
        quantization="none",
    )


def runner_for(tiny: LoadedModel, **engine) -> CompactRunner:
    """Dense weights unless a test names others: exact comparisons against Hugging Face."""
    config = EngineConfig(**{"max_batch_size": 4, "weights": "dense", **engine})
    return CompactRunner(tiny, config, max_seq_len=128)


def sequence(prompt: list[int], adapter=None, prompt_logprobs: int | None = None) -> Sequence:
    seq = Sequence.__new__(Sequence)  # no tokenizer needed below the text layer
    params = SamplingParams(64, temperature=0, prompt_logprobs=prompt_logprobs)
    seq.request = GenerationRequest("r", prompt, params, adapter)
    seq.params = seq.request.params
    seq.output_ids, seq.slot, seq.cache_len, seq.lora_slot = [], None, 0, -1
    seq.finish_reason = None
    seq._prompt_logprobs = None if prompt_logprobs is None else [None]
    return seq


def generate(
    runner: CompactRunner, seqs: list[Sequence], steps: int, shared_prefill: bool = False
) -> list[list[int]]:
    """Greedy: prefill everything (one prompt at a time, or all in shared forwards), then
    `steps` batched decode steps."""
    for seq in seqs:
        runner.add(seq)
    pending = list(seqs)
    while pending:
        for group in [pending] if shared_prefill else [[seq] for seq in pending]:
            for seq, logits in zip(group, runner.prefill(group), strict=True):
                if logits is not None:
                    seq.output_ids.append(int(logits.argmax()))
        pending = [seq for seq in pending if seq.cache_len < seq.prompt_len]
    for _ in range(steps):
        for seq, row in zip(seqs, runner.decode(seqs), strict=True):
            seq.output_ids.append(int(row.argmax()))
    return [s.output_ids for s in seqs]


def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    out = model.generate(
        input_ids=torch.tensor([prompt]),
        max_new_tokens=steps + 1,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[0, len(prompt) :].tolist()


PROMPTS = [[5, 9, 2, 77], list(range(3, 40)), [100] * 11]


def test_matches_hugging_face_greedy(tiny):
    runner = runner_for(tiny)
    for prompt in PROMPTS:
        [ours] = generate(runner, [sequence(prompt)], steps=12)
        assert ours == hf_greedy(tiny.model, prompt, 12)
        runner.release(runner.slots[0])


def test_batch_of_different_lengths_equals_each_alone(tiny):
    runner = runner_for(tiny)
    alone = []
    for prompt in PROMPTS:
        alone += generate(runner, [sequence(prompt)], steps=10)
        runner.release(runner.slots[0])
    together = generate(runner, [sequence(p) for p in PROMPTS], steps=10)
    assert together == alone


def test_chunked_prefill_gives_the_same_logits(tiny):
    prompt = list(range(1, 90))
    whole = runner_for(tiny, prefill_chunk=512)
    chunked = runner_for(tiny, prefill_chunk=16)
    a, b = sequence(prompt), sequence(prompt)
    whole.add(a)
    chunked.add(b)
    logits_a = whole.prefill([a])[0]
    steps = 0
    logits_b = None
    while logits_b is None:
        logits_b = chunked.prefill([b])[0]
        steps += 1
    assert steps == 6
    if whole.model.rows_independent:  # row-independent GEMMs: chunking changes no bit
        assert torch.equal(logits_a, logits_b)
    torch.testing.assert_close(logits_a, logits_b, rtol=1e-4, atol=1e-4)


def test_neighbour_mid_prefill_and_slot_compaction_leave_others_unchanged(tiny):
    runner = runner_for(tiny, prefill_chunk=16)
    [reference] = generate(runner, [sequence(PROMPTS[0])], steps=8)
    runner.release(runner.slots[0])

    first, victim, long_one = sequence(PROMPTS[2]), sequence(PROMPTS[0]), sequence(PROMPTS[1])
    generate(runner, [first, victim], steps=2)
    runner.release(first)  # victim moves from slot 1 into slot 0
    assert victim.slot == 0
    runner.add(long_one)
    for _ in range(5):  # the long prompt is prefilled 16 tokens per step, alongside decoding
        if long_one.cache_len < long_one.prompt_len:
            runner.prefill([long_one])[0]
        [row] = runner.decode([victim])
        victim.output_ids.append(int(row.argmax()))
    assert victim.output_ids == reference[: len(victim.output_ids)]


def test_batched_lora_matches_peft(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    specs = {
        "a": (4, ["q_proj", "v_proj", "down_proj"]),
        "b": (8, ["k_proj", "o_proj", "gate_proj", "up_proj"]),
    }
    runner = runner_for(tiny, max_loras=2, max_lora_rank=8)
    spec = BaseSpec("f" * 64, 2, runner.module_shapes, 8, torch.float32)
    adapters, expected = {}, {}
    prompt = PROMPTS[1]
    for i, (name, (rank, targets)) in enumerate(specs.items()):
        torch.manual_seed(10 + i)
        config = LoraConfig(
            r=rank, lora_alpha=rank * 3, target_modules=targets, init_lora_weights=False
        )
        import copy

        peft_model = get_peft_model(copy.deepcopy(tiny.model), config).eval()
        peft_model.save_pretrained(tmp_path / name)
        adapters[name] = read_adapter(tmp_path / name, name, None, spec, i).weights
        with torch.no_grad():
            expected[name] = peft_model(torch.tensor([prompt])).logits[0, -1]
    seqs = {name: sequence(prompt, adapters[name]) for name in specs}
    base = sequence(prompt)
    for seq in [*seqs.values(), base]:
        runner.add(seq)
    for name, seq in seqs.items():
        torch.testing.assert_close(runner.prefill([seq])[0], expected[name], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        base_logits = tiny.model(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(runner.prefill([base])[0], base_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected["a"], expected["b"])


@pytest.fixture(scope="module")
def tiny_bf16(tiny: LoadedModel) -> LoadedModel:
    import copy

    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    return LoadedModel(model, None, None, "f" * 64, "cpu", torch.bfloat16, "none")


@pytest.mark.parametrize("weights", ["dense", "int8", "int4", "w8a8", "w4a8"])
def test_bf16_rows_are_bitwise_the_same_alone_and_batched(tiny_bf16, weights):
    """The serving dtype: a row's greedy tokens and logits do not depend on its neighbours
    (one-row GEMV kernels, packed int8/int4 GEMMs and the decode attention over a longer
    padded length included)."""
    prompts = [[5, 9, 13, 2], list(range(1, 40)), [7] * 70, [3, 1]]
    batched = generate(runner_for(tiny_bf16, weights=weights), [sequence(p) for p in prompts], 24)
    for prompt, tokens in zip(prompts, batched, strict=True):
        assert generate(runner_for(tiny_bf16, weights=weights), [sequence(prompt)], 24) == [tokens]
    # the prompts prefilled in shared forwards (short and long ones apart: their GEMMs differ)
    runner = runner_for(tiny_bf16, weights=weights)
    shared = generate(runner, [sequence(p) for p in prompts], 24, shared_prefill=True)
    assert shared == batched
    # and cut into chunks of 16 tokens: a prompt's kernel class is set by its whole length
    runner = runner_for(tiny_bf16, weights=weights, prefill_chunk=16)
    chunked = generate(runner, [sequence(p) for p in prompts], 24, shared_prefill=True)
    assert chunked == batched


def test_prompts_share_prefill_forwards_by_kernel_class(tiny_bf16):
    """Where the GEMMs are row-independent (checked at load; true of this CPU kind), chunks
    of up to WIDE_ROWS tokens share one forward and longer ones another."""
    from server.engine.models import WIDE_ROWS, PromptChunk

    model = runner_for(tiny_bf16, weights="int4").model
    if not model.rows_independent:
        pytest.skip("this CPU's GEMMs depend on the batch; prompts prefill one at a time")
    lengths = [4, WIDE_ROWS + 1, 2, 70, WIDE_ROWS]
    chunks = [PromptChunk(list(range(n)), 0, i, -1, n > WIDE_ROWS) for i, n in enumerate(lengths)]
    assert model.prefill_groups(chunks) == [[0, 2, 4], [1, 3]]


@pytest.mark.parametrize(
    ("weights", "tolerance"), [("int8", 0.05), ("int4", 0.2), ("w8a8", 0.05), ("w4a8", 0.2)]
)
def test_packed_weights_stay_close_to_dense(tiny_bf16, weights, tolerance):
    """Weight-only int8/int4 change logits by rounding error, not behaviour; prompt chunks
    (dequantized grid) and decode rows (packed kernel) see the same weights."""
    prompt = list(range(1, 40))  # > WIDE_ROWS: the dequantized path
    logits: dict[tuple[str, str], torch.Tensor] = {}
    for kind in ("dense", weights):
        runner = runner_for(tiny_bf16, weights=kind)
        assert runner.model.weights == kind
        seq = sequence(prompt)
        runner.add(seq)
        logits[kind, "prefill"] = runner.prefill([seq])[0]
        seq.output_ids.append(7)
        logits[kind, "decode"] = runner.decode([seq])[0]
    for step in ("prefill", "decode"):
        dense, packed = logits["dense", step], logits[weights, step]
        assert torch.allclose(dense, packed, atol=tolerance * dense.abs().max().item())


def test_int4_packs_the_bundled_layout_exactly():
    """Weights already on a 4-bit grid of 32-wide groups (like the Q4_1 GGUF the bundled
    model was published in) come back exactly from the int4 packing."""
    from server.engine.linear import Int4Linear

    torch.manual_seed(0)
    codes = torch.randint(0, 16, (64, 96)).float()
    codes[:, ::32] = 0  # every group spans its full range, as Q4_1 quantization makes it
    codes[:, 1::32] = 15
    scale = torch.rand(64, 3, 1) * 0.01 + 0.001
    low = torch.randn(64, 3, 1) * 0.01
    weight = (codes.view(64, 3, 32) * scale + low).view(64, 96).to(torch.bfloat16)
    linear = Int4Linear(weight)
    torch.testing.assert_close(linear.dense, weight, rtol=0.02, atol=1e-3)
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    torch.testing.assert_close(linear(x), x @ linear.dense.t(), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_bf16"])
def test_auto_weights_keep_the_checkpoints_precision_in_either_compute_dtype(fixture, request):
    """auto, where ragtune's a8 kernel builds: w4a8 for layers already on a 4-bit grid (a
    Q4_0/Q4_1 GGUF, as the bundled SmolLM2), w8a8 for any other checkpoint (random float
    weights here); torch's int4 kernel where the a8 kernel cannot run (no compiler)."""
    import copy

    from server.engine import native
    from server.engine.quantize import group_dequantized, group_grid

    loaded = request.getfixturevalue(fixture)
    if native.unavailable_reason() is not None:
        assert runner_for(loaded, weights="auto").model.weights == "int4"
        return
    assert runner_for(loaded, weights="auto").model.weights == "w8a8"
    snapped = copy.deepcopy(loaded.model)
    for module in snapped.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            codes, scale, offset = group_grid(module.weight.detach(), 32, 4)
            snapped_weight = group_dequantized(codes, scale, offset)
            module.weight.data = snapped_weight.to(module.weight.dtype)
    on_grid = LoadedModel(snapped, None, None, "f" * 64, "cpu", loaded.dtype, "none")
    assert runner_for(on_grid, weights="auto").model.weights == "w4a8"


def test_auto_weights_fall_back_to_int4_and_say_why(tiny, monkeypatch, caplog):
    monkeypatch.setattr(native, "unavailable_reason", lambda: "no C++ compiler (g++ or $CXX)")
    with caplog.at_level("WARNING"):
        assert decode_weights(EngineConfig(weights="auto"), tiny) == "int4"
    assert "no C++ compiler" in caplog.text
    with pytest.raises(ValueError, match="w4a8 cannot run here: no C\\+\\+ compiler"):
        decode_weights(EngineConfig(weights="w4a8"), tiny)


@pytest.mark.parametrize(
    ("weights", "tolerance"), [("int8", 0.05), ("int4", 0.2), ("w8a8", 0.05), ("w4a8", 0.2)]
)
def test_packed_weights_serve_fp32_compute(tiny, weights, tolerance):
    """Under fp32 compute (CPUs without native bf16) the packed kernels take bf16 rows and
    give fp32 back; prompt chunks use the fp32 dequantized grid. Logits stay close to the
    dense fp32 model's, and rows stay independent of their batch neighbours."""
    prompts = [[1, 5, 9, 13, 17], [2, 4, 8, 16, 32, 64, 3, 6, 12, 24, 48, 96, 7, 14, 28, 56, 9]]
    for prompt in prompts:
        dense = runner_for(tiny, weights="dense")
        packed = runner_for(tiny, weights=weights)
        assert packed.model.dtype == torch.float32
        for runner in (dense, packed):
            runner.add(sequence(prompt))
        a, b = dense.prefill(dense.slots)[0], packed.prefill(packed.slots)[0]
        assert b.dtype == torch.float32
        assert (a - b).abs().max() <= tolerance * a.abs().max()
    batched = generate(runner_for(tiny, weights=weights), [sequence(p) for p in prompts], 12)
    for prompt, tokens in zip(prompts, batched, strict=True):
        assert generate(runner_for(tiny, weights=weights), [sequence(prompt)], 12) == [tokens]


@pytest.mark.parametrize("weights", ["int8", "int4", "w4a8"])
def test_packed_kernels_give_one_row_the_bits_it_gets_among_two(weights):
    """Why a lone base-model row may skip the two-row trick with packed weights."""
    from server.engine.linear import linear_for

    torch.manual_seed(0)
    for out_features, in_features in ((96, 64), (64, 128)):
        linear = linear_for(weights, torch.randn(out_features, in_features).bfloat16() * 0.05)
        rows = torch.randn(2, in_features, dtype=torch.bfloat16)
        assert torch.equal(linear(rows[:1].contiguous()), linear(rows)[:1])


@pytest.mark.parametrize("mode", ["shifted", "split"])
def test_w8a8_vocabulary_projection_is_exact_per_row_and_close_to_dense(tiny_bf16, mode):
    """The int4 kind's vocabulary projection (int8 weights x int8 activations, integer sums):
    a row gets the same bits alone, among 2 or among 16 rows (the integer products are
    exact), equal to the integer reference, and within int8 rounding of the bf16 product.
    "split": the form for CPUs without VNNI (positive and negative parts), exact on every
    CPU, so checked everywhere."""
    from server.engine.linear import W8A8Linear

    if W8A8Linear.mode() is None or (mode == "shifted" and W8A8Linear.mode() != mode):
        pytest.skip(f"oneDNN's int8 linear does not sum the {mode} form exactly here")
    torch.manual_seed(0)
    weight = (torch.randn(4096, 576) * 0.05).bfloat16()
    linear = W8A8Linear(weight)
    linear.split_signs = mode == "split"
    x = torch.randn(16, 576, dtype=torch.bfloat16)
    full = linear(x)
    assert full.dtype == torch.float32
    for lo, hi in ((0, 1), (5, 6), (3, 5), (0, 16)):
        assert torch.equal(linear(x[lo:hi]), full[lo:hi])
    # the arithmetic it stands for: float32 scales and codes, integer sums in float64
    weight_scales = weight.float().abs().amax(1) / 127
    weight_codes = torch.round(weight.float() / weight_scales[:, None]).double()
    row_scales = x.float().abs().amax(1, keepdim=True) / 127
    row_codes = torch.round(x.float() / row_scales).double()
    reference = (row_codes @ weight_codes.t()) * weight_scales.double() * row_scales.double()
    torch.testing.assert_close(full.double(), reference, rtol=1e-5, atol=1e-5)
    dense = x.float() @ weight.float().t()
    assert ((full - dense).norm() / dense.norm()) < 0.02
    # the int4 kind serves its logits through it (or through ragtune's kernel for the same
    # arithmetic, tests/engine/test_channel_int8.py)
    from server.engine.channel_int8 import ChannelInt8Linear

    head = runner_for(tiny_bf16, weights="int4").model.lm_head
    assert isinstance(head, (W8A8Linear, ChannelInt8Linear))


def test_int4_head_is_weight_only_int8_where_int8_gemms_are_not_exact(tiny_bf16, monkeypatch):
    """On a CPU whose int8 GEMM saturates (no VNNI) or a torch without oneDNN's int8 linear,
    the vocabulary projection keeps bf16 activations."""
    from server.engine.channel_int8 import ChannelInt8Linear
    from server.engine.linear import Int8Linear, W8A8Linear

    monkeypatch.setattr(W8A8Linear, "supported", staticmethod(lambda: False))
    monkeypatch.setattr(ChannelInt8Linear, "supported", staticmethod(lambda: False))
    assert isinstance(runner_for(tiny_bf16, weights="int4").model.lm_head, Int8Linear)


def test_packed_weights_come_from_the_checkpoint_whatever_the_bnb_format(tiny_bf16, tmp_path):
    """An NF4-loaded model decodes with the same int4/int8 weights, bit for bit, as the
    unquantized one: both are packed from the safetensors checkpoint, never re-rounded from
    bitsandbytes' grid. `dense` serves the loaded (NF4) weights as they are."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_bf16.model.save_pretrained(tmp_path)

    def load(quantization: str, **kwargs) -> LoadedModel:
        # both through from_pretrained, as the server loads them (rotary buffers included)
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path, dtype=torch.bfloat16, device_map={"": "cpu"}, **kwargs
        )
        return LoadedModel(model, None, tmp_path, "f" * 64, "cpu", torch.bfloat16, quantization)

    nf4 = load(
        "nf4",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        ),
    )
    plain = load("none")
    prompts = [[5, 9, 13, 2], list(range(1, 40))]
    for weights in ("int4", "int8"):
        from_nf4 = generate(runner_for(nf4, weights=weights), [sequence(p) for p in prompts], 12)
        from_plain = generate(
            runner_for(plain, weights=weights), [sequence(p) for p in prompts], 12
        )
        assert from_nf4 == from_plain
    dense_nf4 = runner_for(nf4, weights="dense").model.layers[0].qkv.weight
    dense_plain = runner_for(plain, weights="dense").model.layers[0].qkv.weight
    assert not torch.equal(dense_nf4, dense_plain)


def test_kv_cache_capacity_follows_the_longest_sequence_and_keeps_the_data():
    """The position axis grows and shrinks by buckets, the slot axis holds the running
    sequences (a power of two); slots in use keep their positions, new positions are zero
    (masked attention multiplies them), and a decode view spanning the capacity is one
    contiguous block (no copy before the batched GEMM)."""
    from server.engine.kv_cache import KVCache

    cache = KVCache(2, 4, 1, 128, 2, torch.float32, "cpu", bucket_size=16)
    assert (cache.capacity, cache.slot_capacity) == (16, 1)
    k = torch.arange(10 * 2, dtype=torch.float32).view(10, 1, 2)
    for slot in (0, 1):
        cache.ensure_slots(slot + 1, rows=slot)
        cache.write_prompt(1, slot, 0, k + slot, -(k + slot))
    assert cache.slot_capacity == 2
    cache.ensure_slots(3, rows=2)
    assert cache.slot_capacity == 4  # never past num_slots
    cache.fit(40, rows=2)
    assert (cache.capacity, cache.slot_capacity) == (48, 2)
    keys_t, values = cache.prompt_view(1, 1, 10)
    assert torch.equal(keys_t, (k + 1).permute(1, 2, 0))
    assert torch.equal(values, -(k + 1).transpose(0, 1))
    assert not cache.keys_t[1][:, ..., 10:].any() and not cache.values[0].any()
    keys_t, values = cache.batch_view(1, 2, cache.capacity)
    assert keys_t.is_contiguous() and values.is_contiguous()
    cache.fit(11, rows=1)  # the sequence in slot 1 left
    assert (cache.capacity, cache.slot_capacity) == (16, 1)
    assert torch.equal(cache.prompt_view(1, 0, 10)[0], k.permute(1, 2, 0))
    cache.ensure_slots(2, rows=1)
    assert not cache.keys_t[1][1].any()  # the slot that left comes back zeroed
    cache.reserve(200, rows=1)
    assert (cache.capacity, cache.slot_capacity) == (128, 2)  # never past max_len


def test_kv_cache_with_headroom_moves_less_and_keeps_the_data():
    """The attention kernel's cache (read through a stride): it grows to a quarter more than
    the longest sequence needs and shrinks only once it holds more than twice that, so a
    busy batch's longest sequence coming and going does not re-lay every layer out; slots
    in use keep their positions either way."""
    from server.engine.kv_cache import KVCache

    cache = KVCache(2, 4, 1, 256, 2, torch.float32, "cpu", bucket_size=16, headroom=True)
    k = torch.arange(10 * 2, dtype=torch.float32).view(10, 1, 2)
    cache.ensure_slots(1, rows=0)
    cache.write_prompt(1, 0, 0, k, -k)
    cache.fit(40, rows=1)  # needs 48: grows to bucket(48 + 12)
    assert cache.capacity == 64
    moves = cache.resizes
    for length in (41, 60, 33, 17):  # within [need, 2 * need]: stays put
        cache.fit(length, rows=1)
    assert (cache.capacity, cache.resizes) == (64, moves)
    cache.fit(11, rows=1)  # 16 needed, 64 held: more than twice, shrinks
    assert cache.capacity == 32 and cache.resizes == moves + 1
    assert torch.equal(cache.prompt_view(1, 0, 10)[0], k.permute(1, 2, 0))
    assert torch.equal(cache.prompt_view(1, 0, 10)[1], -k.transpose(0, 1))
    cache.fit(500, rows=1)
    assert cache.capacity == 256  # never past max_len


def test_a_prompt_whose_shared_prefill_fails_fails_alone(tiny):
    """A forward shared by several prompts that raises is retried one prompt at a time, so
    only the prompt that fails on its own ends with an error; the others start decoding."""
    from transformers import AutoTokenizer

    from ragtune.config import default_home
    from ragtune.models import resolve_model_dir
    from server.engine.scheduler import Scheduler

    runner = runner_for(tiny)

    class PoisonedPrompt:  # the real runner, except that token 99 makes a prefill raise
        def __getattr__(self, name):
            return getattr(runner, name)

        def prefill(self, seqs):
            if any(99 in seq.request.prompt_ids for seq in seqs):
                raise RuntimeError("poisoned prompt")
            return runner.prefill(seqs)

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("bundled", default_home()))
    prompts = [[5, 9, 2], [99, 4, 4, 4], list(range(3, 40))]
    seqs = [
        Sequence(
            GenerationRequest(f"r{i}", p, SamplingParams(8, 0.0), None), tokenizer, set(), print
        )
        for i, p in enumerate(prompts)
    ]
    scheduler = Scheduler(PoisonedPrompt(), max_batch_tokens=1024)
    for seq in seqs:
        scheduler.add(seq)
    scheduler.step()
    assert seqs[1].finish_reason == "error"
    assert [len(seqs[0].output_ids), len(seqs[2].output_ids)] == [2, 2]  # prefill + one decode


@pytest.mark.parametrize("weights", ["dense", "int4"])
def test_prompts_reuse_cached_prefixes_exactly(tiny_bf16, weights):
    """A prompt that starts like an earlier one restores the shared blocks of 16 tokens and
    prefills only the rest, with the same tokens as on a server that never saw the first."""
    shared = list(range(1, 41))  # two full blocks and a half
    first, second = [*shared, 7, 8, 9], [*shared, 50, 51]
    runner = runner_for(tiny_bf16, weights=weights)
    if runner.prefix_cache is None:
        pytest.skip("this CPU's GEMMs depend on the batch: no exact prefix reuse")
    generate(runner, [sequence(first)], 12)
    runner.release(runner.slots[0])
    warm = sequence(second)
    [tokens] = generate(runner, [warm], 12)
    assert runner.prefix_cache.hit_tokens == 32
    cold = runner_for(tiny_bf16, weights=weights, prefix_cache_mb=0)
    assert cold.prefix_cache is None
    assert generate(cold, [sequence(second)], 12) == [tokens]
    # a prompt no longer than the cached blocks still computes its last token
    runner.release(warm)
    [again] = generate(runner, [sequence(shared[:32])], 4)
    assert runner.prefix_cache.hit_tokens == 32 + 16
    assert generate(cold, [sequence(shared[:32])], 4)[-1] == again


def test_no_prompt_chunk_is_a_single_row(tiny):
    """The one-row GEMM path is not row-independent on every input, so chunking never leaves
    a last chunk of one token (17 tokens in chunks of 16: 15 + 2)."""
    runner = runner_for(tiny, prefill_chunk=16)
    seq = sequence(list(range(1, 18)))
    runner.add(seq)
    assert runner.prefill([seq]) == [None] and seq.cache_len == 15
    [logits] = runner.prefill([seq])
    assert logits is not None and seq.cache_len == 17


def test_models_the_compact_forward_cannot_run_use_the_serial_fallback():
    """A Llama with attention biases (as Qwen2 has) goes to HFModelRunner: one sequence at a
    time with Hugging Face's own module and cache, the same greedy tokens as `generate`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from server.engine.hf_runner import HFModelRunner
    from server.engine.runner import build_runner

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
    )
    model = LlamaForCausalLM(config).eval()
    loaded = LoadedModel(model, None, None, "f" * 64, "cpu", torch.float32, "none")
    runner = build_runner(loaded, EngineConfig(max_batch_size=2), max_seq_len=128)
    assert isinstance(runner, HFModelRunner)
    seqs = [sequence(PROMPTS[0]), sequence(PROMPTS[2])]
    for seq in seqs:
        runner.add(seq)
    for seq, logits in zip(seqs, runner.prefill(seqs), strict=True):
        seq.output_ids.append(int(logits.argmax()))
    for _ in range(6):
        for seq, row in zip(seqs, runner.decode(seqs), strict=True):
            seq.output_ids.append(int(row.argmax()))
    for seq, prompt in zip(seqs, (PROMPTS[0], PROMPTS[2]), strict=True):
        assert seq.output_ids == hf_greedy(model, prompt, 6)
        runner.release(seq)
    assert not runner.can_admit(sequence(PROMPTS[0], adapter=object()))  # base model only


def tiny_adapter(tiny: LoadedModel, runner: CompactRunner, path, rank: int, seed: int):
    """A random PEFT LoRA on the tiny model, as the runner serves it."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank * 2,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
    )
    get_peft_model(copy.deepcopy(tiny.model).float(), config).save_pretrained(path)
    spec = BaseSpec("f" * 64, 2, runner.module_shapes, 8, runner.model.dtype)
    return read_adapter(path, path.name, None, spec, seed).weights


def share_extents(runner: CompactRunner, sharing: str) -> None:
    """Force torch's decode attention over extent classes and how rows of different classes
    share its calls: one call per class, or what this device's start-up check allows
    (computed here even where the GEMMs are row-independent and the model skipped it)."""
    model = runner.model
    model.attention_kernel, runner.extent_classes = False, True
    model.padded_extents = (
        PaddedExtents() if sharing == "per_class" else padded_extents_exact(model, 128)
    )


@pytest.mark.parametrize("sharing", ["per_class", "checked", "kernel"])
@pytest.mark.parametrize("fixture", ["tiny", "tiny_bf16"])
def test_fixed_row_decode_keeps_rows_independent_of_neighbours(fixture, sharing, request, tmp_path):
    """The path for devices whose GEMMs depend on the row count (AMX, MKL): LoRA GEMMs on a
    fixed row count and each row's attention over its own extent class, classes sharing the
    calls this device's check allows, or on ragtune's attention kernel (each row over its
    own keys). Forced here so it is checked on every CPU: a row's greedy tokens alone == in
    a mixed-adapter batch of different lengths, and the logits stay those of the usual
    path."""
    loaded = request.getfixturevalue(fixture)
    attention = "kernel" if sharing == "kernel" else "torch"
    if attention == "kernel" and (reason := native.unavailable_reason()) is not None:
        pytest.skip(reason)

    def fixed_runner() -> CompactRunner:
        runner = runner_for(
            loaded, weights="int4", max_loras=2, max_lora_rank=8, decode_attention=attention
        )
        runner.model.fixed_decode_rows = 4
        if sharing != "kernel":
            share_extents(runner, sharing)
        return runner

    probe = fixed_runner()
    adapters = [tiny_adapter(loaded, probe, tmp_path / f"a{i}", 4 + 4 * i, i) for i in range(2)]
    jobs = [(PROMPTS[0], None), (PROMPTS[1], adapters[0]), ([7] * 70, adapters[1])]
    together = generate(fixed_runner(), [sequence(p, a) for p, a in jobs], 24)
    for (prompt, adapter), tokens in zip(jobs, together, strict=True):
        assert generate(fixed_runner(), [sequence(prompt, adapter)], 24) == [tokens]
    # the same first decode step through the usual path (one shared extent)
    usual, fixed = runner_for(loaded, weights="int4", max_loras=2, max_lora_rank=8), fixed_runner()
    logits = []
    for runner in (usual, fixed):
        seqs = [sequence(p, a) for p, a in jobs]
        generate(runner, seqs, 0)
        logits.append(runner.decode(seqs))
    torch.testing.assert_close(logits[0], logits[1], rtol=0.02, atol=0.02)


@pytest.mark.parametrize("sharing", ["per_class", "checked"])
def test_a_leaving_sequence_keeps_slot_order_and_its_neighbours_tokens(tiny, sharing):
    """Fixed-row decode (AMX, MKL): a release moves the later slots down one, so slots stay in
    admission order (longest first) and each extent class is a run of neighbouring slots,
    read in place, or all classes share one call where the device's check allows; no
    remaining row's tokens change."""

    def fixed_runner() -> CompactRunner:
        runner = runner_for(tiny)
        runner.model.fixed_decode_rows = 4
        share_extents(runner, sharing)
        return runner

    prompts = [[5] * 70, PROMPTS[1], PROMPTS[0], PROMPTS[2]]
    alone = [generate(fixed_runner(), [sequence(p)], 14)[0] for p in prompts]
    runner = fixed_runner()
    seqs = [sequence(p) for p in prompts]
    generate(runner, seqs, 4)
    runner.release(seqs[1])
    remaining = [seqs[0], seqs[2], seqs[3]]
    assert [s.slot for s in remaining] == [0, 1, 2] and runner.slots == remaining
    positions = torch.tensor([s.cache_len for s in remaining])
    extents = plan_decode(runner.model, positions, runner.cache, None)
    if runner.model.padded_extents.values:  # one call over 96 keys
        assert [(rows, length) for rows, length, _ in extents.groups] == [(None, 96)]
    else:  # 64 and 96 keys
        assert [rows for rows, _, _ in extents.groups] == [slice(1, 3), slice(0, 1)]
        assert extents.shared_softmax == runner.model.padded_extents.softmax
    for _ in range(10):
        for seq, row in zip(remaining, runner.decode(remaining), strict=True):
            seq.output_ids.append(int(row.argmax()))
    for seq, expected in zip(remaining, (alone[0], alone[2], alone[3]), strict=True):
        assert seq.output_ids == expected


def test_prefix_blocks_are_shared_only_within_a_cache_namespace(tiny):
    """Tenants apart: a prompt cached for one namespace (an API key's tenant, a cache_salt)
    is never restored for another, which could otherwise learn it by timing. The cache is
    forced on here (the keying is what is checked, on every CPU)."""
    from server.engine.prefix_cache import PrefixCache

    runner = runner_for(tiny)
    runner.prefix_cache = PrefixCache(runner.cache, runner.cache.bucket_size, 8 * 2**20)
    prompt = list(range(1, 41))

    def run(namespace: str) -> None:
        seq = sequence(prompt)
        seq.request.cache_namespace = namespace
        generate(runner, [seq], 2)
        runner.release(seq)

    run("tenant-a")
    assert runner.prefix_cache.hit_tokens == 0
    run("tenant-b")
    assert runner.prefix_cache.hit_tokens == 0
    run("tenant-a")
    assert runner.prefix_cache.hit_tokens == 32
