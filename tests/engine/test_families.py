"""Every model family of the compact engine against Hugging Face and PEFT, on tiny random
models (float32, dense weights): greedy tokens equal `generate`'s, batched LoRA logits equal
PEFT's, and a row's tokens do not change inside a mixed batch of base and adapter rows; the
prompts are longer than the sliding window where the family has one."""

from __future__ import annotations

import pytest
import torch

from ragtune.config import EngineConfig
from ragtune.models import LoadedModel
from server.adapters.loader import BaseSpec, read_adapter
from server.engine.models import MODEL_CLASSES, Gemma3Model, LlamaModel, Phi3Model
from server.engine.runner import CompactRunner, build_runner
from tests.engine.families import FAMILY_NAMES, WINDOW, hf_greedy, peft_adapter, tiny_model
from tests.engine.test_runner import generate, sequence

PROMPTS = [list(range(3, 3 + 3 * WINDOW)), [5, 9, 2, 77, 4], [100, 7] * (2 * WINDOW)]
STEPS = 2 * WINDOW  # decode runs past the window too


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request) -> tuple[str, LoadedModel]:
    model = tiny_model(request.param)
    return request.param, LoadedModel(model, None, None, "f" * 64, "cpu", torch.float32, "none")


def runner_for(loaded: LoadedModel, **engine) -> CompactRunner:
    config = EngineConfig(
        **{"max_batch_size": 4, "max_loras": 2, "max_lora_rank": 8, "weights": "dense", **engine}
    )
    runner = build_runner(loaded, config, max_seq_len=128)
    assert isinstance(runner, CompactRunner)
    return runner


def test_every_family_has_its_module():
    assert {name: cls.__name__ for name, cls in MODEL_CLASSES.items()} == {
        "llama": "LlamaModel",
        "mistral": "LlamaModel",
        "qwen2": "Qwen2Model",
        "qwen3": "Qwen3Model",
        "gemma2": "Gemma2Model",
        "gemma3_text": "Gemma3Model",
        "gemma3": "Gemma3Model",
        "phi3": "Phi3Model",
    }
    assert Phi3Model.LORA_GROUPS["qkv"] == ("qkv_proj",)
    assert LlamaModel.LORA_GROUPS["qkv"] == ("q_proj", "k_proj", "v_proj")
    assert Gemma3Model.MODEL_TYPES[0] == "gemma3_text"
    from transformers import Gemma2Config

    from server.engine.models import model_class

    # biases the projections would drop: the fallback runner, with the reason
    assert model_class(Gemma2Config(attention_bias=True)) == (None, "attention biases")


def test_greedy_tokens_match_hugging_face(family):
    name, loaded = family
    runner = runner_for(loaded)
    assert runner.kernels()["family"] == type(runner.model).__name__.removesuffix("Model").lower()
    if name in ("mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"):
        assert WINDOW in runner.model.windows
    for prompt in PROMPTS:
        [ours] = generate(runner, [sequence(prompt)], steps=STEPS)
        assert ours == hf_greedy(loaded.model, prompt, STEPS), name
        runner.release(runner.slots[0])


def test_chunked_prefill_across_the_window_gives_the_same_tokens(family):
    _, loaded = family
    prompt = PROMPTS[2]
    whole = generate(runner_for(loaded, prefill_chunk=512), [sequence(prompt)], 6)
    chunked = generate(runner_for(loaded, prefill_chunk=16), [sequence(prompt)], 6)
    assert whole == chunked


def test_batched_lora_matches_peft_and_rows_keep_their_tokens_in_a_mixed_batch(family, tmp_path):
    name, loaded = family
    runner = runner_for(loaded)
    spec = BaseSpec("f" * 64, 2, runner.module_shapes, 8, torch.float32)
    peft_model = peft_adapter(loaded.model, name, tmp_path / "a")
    adapter = read_adapter(tmp_path / "a", "a", None, spec, 0).weights
    assert adapter.target_modules == set(runner.module_shapes)
    prompt = PROMPTS[0]
    with torch.no_grad():
        expected = peft_model(torch.tensor([prompt])).logits[0, -1]
    seq = sequence(prompt, adapter)
    runner.add(seq)
    torch.testing.assert_close(runner.prefill([seq])[0], expected, rtol=1e-4, atol=1e-4)
    runner.release(seq)

    peft_tokens = hf_greedy(peft_model, prompt, STEPS)
    assert peft_tokens != hf_greedy(loaded.model, prompt, STEPS)
    [alone] = generate(runner_for(loaded), [sequence(prompt, adapter)], STEPS)
    assert alone == peft_tokens, name
    jobs = [(PROMPTS[1], None), (prompt, adapter), (PROMPTS[2], None), (PROMPTS[2], adapter)]
    mixed = generate(runner_for(loaded), [sequence(p, a) for p, a in jobs], STEPS)
    assert mixed[1] == alone
    for (p, a), tokens in zip(jobs, mixed, strict=True):
        assert generate(runner_for(loaded), [sequence(p, a)], STEPS) == [tokens]


def test_a_lora_of_another_layout_is_refused(family, tmp_path):
    """Phi-3's fused names on a split-projection family, and the reverse: a clear error."""
    from server.adapters.errors import AdapterError

    name, loaded = family
    other = "llama" if name == "phi3" else "phi3"
    runner = runner_for(loaded)
    spec = BaseSpec("f" * 64, 2, runner.module_shapes, 8, torch.float32)
    peft_adapter(tiny_model(other), other, tmp_path / "x")
    with pytest.raises(AdapterError, match="target modules"):
        read_adapter(tmp_path / "x", "x", None, spec, 0)


@pytest.mark.parametrize("weights", ["dense", "int4", "w8a8", "w4a8"])
def test_bf16_rows_keep_their_tokens_in_a_mixed_batch(family, weights, tmp_path):
    """The serving dtype and kernels: base and adapter rows of different lengths, alone and
    together, give the same greedy tokens (the packed int4 weights and the fixed-row path
    where this CPU's GEMMs depend on the row count included)."""
    import copy

    name, loaded = family
    model = copy.deepcopy(loaded.model).to(torch.bfloat16)
    bf16 = LoadedModel(model, None, None, "f" * 64, "cpu", torch.bfloat16, "none")
    probe = runner_for(bf16, weights=weights)
    spec = BaseSpec("f" * 64, 2, probe.module_shapes, 8, torch.bfloat16)
    peft_adapter(loaded.model, name, tmp_path / "a")
    adapter = read_adapter(tmp_path / "a", "a", None, spec, 0).weights
    jobs = [(PROMPTS[0], adapter), (PROMPTS[1], None), (PROMPTS[2], adapter)]
    together = generate(runner_for(bf16, weights=weights), [sequence(p, a) for p, a in jobs], 20)
    for (prompt, a), tokens in zip(jobs, together, strict=True):
        assert generate(runner_for(bf16, weights=weights), [sequence(prompt, a)], 20) == [tokens]


@pytest.mark.parametrize("prefill_chunk", [16, 512])
def test_prompt_logprobs_match_hugging_face_across_chunks(family, prefill_chunk):
    """Echo/scoring: every prompt token after the first gets log_softmax of the row before
    it (and the top alternatives), however the prompt is cut into chunks."""
    name, loaded = family
    prompt = PROMPTS[2] + PROMPTS[0]
    runner = runner_for(loaded, prefill_chunk=prefill_chunk)
    seq = sequence(prompt, prompt_logprobs=3)
    runner.add(seq)
    while runner.prefill([seq])[0] is None:
        pass
    entries = seq._prompt_logprobs
    assert entries[0] is None and len(entries) == len(prompt)
    with torch.no_grad():
        expected = torch.log_softmax(loaded.model(torch.tensor([prompt])).logits[0, :-1], -1)
    chosen = expected.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    ours = torch.tensor([e.logprob for e in entries[1:]])
    torch.testing.assert_close(ours, chosen, rtol=1e-4, atol=1e-4)
    assert [e.token_id for e in entries[1:]] == prompt[1:]
    top = expected.topk(3, dim=-1)
    for i, entry in enumerate(entries[1:]):
        assert [t for t, _ in entry.top][:1] == top.indices[i].tolist()[:1], name
        assert entry.top[0][1] == pytest.approx(float(top.values[i, 0]), abs=1e-4)


def test_sliding_window_layers_keep_a_ring_of_positions_and_still_match_hugging_face(family):
    """A sliding-window layer's KV cache holds its window plus one prompt chunk (a ring),
    not the whole sequence: past the ring, prompt chunks and decode steps wrap around it,
    and the greedy tokens still equal Hugging Face's, alone and in a batch; a restored
    prompt prefix (where the prefix cache runs) gives the same tokens as a computed one."""
    name, loaded = family
    runner = runner_for(loaded, prefill_chunk=16)
    windowed = [i for i, w in enumerate(runner.model.layers) if w.window is not None]
    if not windowed:  # Llama: no window, every layer keeps every position
        assert runner.cache.ring is None and runner.kernels()["window_kv"] == "full"
        return
    ring = runner.cache.ring
    assert ring is not None and WINDOW + 16 <= ring < 128, name
    assert runner.kernels()["window_kv"] == f"ring {ring}"
    cache = runner.cache
    per_position = 2 * cache.num_slots * cache.num_kv_heads * cache.head_dim * 4
    assert cache.nbytes == per_position * (
        (cache.num_layers - len(windowed)) * 128 + len(windowed) * ring
    )
    prompt = [(7 * i) % 500 + 3 for i in range(60)]
    steps = 50  # 110 positions: past the ring in prompt chunks and in decode steps
    [alone] = generate(runner, [sequence(prompt)], steps)
    assert alone == hf_greedy(loaded.model, prompt, steps), name
    for layer in range(cache.num_layers):
        held = cache.keys_t[layer].shape[-1]
        assert held == ring if layer in windowed else held >= len(prompt) + steps
    jobs = [PROMPTS[1], prompt, PROMPTS[2]]
    mixed = generate(runner_for(loaded, prefill_chunk=16), [sequence(p) for p in jobs], steps)
    assert mixed[1] == alone
    assert mixed[0] == hf_greedy(loaded.model, PROMPTS[1], steps), name

    # the prefix cache keeps a long prompt's blocks before the ring overwrites them (forced
    # on: this checks the ring's bookkeeping on every CPU; restoring at a chunk boundary
    # recomputes the rest exactly as the first run did)
    from server.engine.prefix_cache import PrefixCache

    cached = runner_for(loaded, prefill_chunk=16)
    cached.prefix_cache = PrefixCache(cached.cache, 16, 16 * 2**20)

    long = [(11 * i) % 500 + 3 for i in range(100)]  # longer than the ring on every CPU

    def prompt_kv() -> tuple[list[int], tuple[torch.Tensor, torch.Tensor]]:
        seq = sequence(long)
        tokens = generate(cached, [seq], 3)[0]
        kv = cached.cache.read_positions(0, cached.cache.intact_from(len(long) + 3), len(long))
        cached.release(seq)
        return tokens, kv

    first, first_kv = prompt_kv()
    again, again_kv = prompt_kv()
    assert cached.prefix_cache.hit_tokens == 96  # six blocks of 100 tokens, four to compute
    assert again == first == hf_greedy(loaded.model, long, 3), name
    for ours, theirs in zip(again_kv, first_kv, strict=True):
        assert torch.equal(ours, theirs)


def test_gemma2_caps_the_final_logits_in_the_heads_dtype():
    """Gemma2ForCausalLM divides, tanhs and multiplies the head's bf16 logits; capping them
    after widening to float32 gives other values (and other ties for greedy decoding)."""
    model = tiny_model("gemma2").to(torch.bfloat16)
    loaded = LoadedModel(model, None, None, "f" * 64, "cpu", torch.bfloat16, "none")
    ours = runner_for(loaded).model
    hidden = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    hidden = (8 * hidden).to(torch.bfloat16)
    cap = model.config.final_logit_softcapping
    with torch.inference_mode():
        head = model.lm_head(model.model.norm(hidden))
        expected = (torch.tanh(head / cap) * cap).float()
        assert torch.equal(ours._logits(hidden), expected)
        widened = torch.tanh(head.float() / cap) * cap
    assert not torch.equal(widened, expected)  # the test tells the two apart
