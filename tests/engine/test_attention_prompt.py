"""Prompt attention on ragtune's kernel (server/engine/attention_prompt.py, csrc/
attention_prompt.cpp), each of its bodies (bf16 pairs on AVX-512 BF16; 8 float lanes for
float32, and for bf16 where decode takes its float path): a prompt row's result is a decode
step's at its position over the same keys, bit for bit; it does not depend on the chunk, the
rows beside it or the thread count; it is Hugging Face's eager attention to within the
dtype's rounding, no further from an exact reference than torch's route. The bundled
models' prompts through it, whole, chunked and restored from the prefix cache, are in
test_prompt_gemm.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ragtune.config import EngineConfig
from server.engine import attention_prompt, attention_rows, native
from server.engine.attention_rows import RowsPlan
from server.engine.kv_cache import KVCache
from server.engine.models.attention import prompt_attention
from server.engine.runner import CompactRunner
from tests.engine.test_runner import tiny, tiny_bf16  # noqa: F401  (fixtures)

# the kernel's own tests; the route's choice is tested on every CPU
needs_kernel = pytest.mark.skipif(
    native.unavailable_reason() is not None, reason="the prompt kernel needs the kernels built"
)
MINUS_INF = float("-inf")
# (heads, kv_heads, head_dim): SmolLM2, Gemma 3, 10 heads a KV head (two tasks' worth), one
SHAPES = [(9, 3, 64), (4, 1, 256), (20, 2, 32), (2, 2, 32)]
FLOAT_SHAPES = [(4, 2, 48)]  # a head_dim only the float body takes (a multiple of 16)
# (body, dtype): the bf16 pair body where this CPU has AVX-512 BF16; the float body for
# float32, and for bf16 as on a CPU without it (decode's float path then too)
BODIES = [
    pytest.param(
        ("pairs", torch.bfloat16),
        marks=pytest.mark.skipif(not native.attention_pairs(), reason="no AVX-512 BF16"),
    ),
    ("float", torch.float32),
    ("float", torch.bfloat16),
]


@pytest.fixture(params=BODIES, ids=["pairs-bf16", "float-fp32", "float-bf16"])
def body(request, monkeypatch) -> torch.dtype:
    """The dtype of the case, with the CPU's pair body switched off for the float ones."""
    name, dtype = request.param
    if name == "float":
        monkeypatch.setattr(native, "attention_pairs", lambda: False)
    return dtype


def model(
    heads: int, kv_heads: int, d: int, kernel: bool = True, dtype: torch.dtype = torch.bfloat16
) -> SimpleNamespace:
    return SimpleNamespace(
        head_dim=d, num_heads=heads, num_kv_heads=kv_heads, q_size=heads * d, scale=d**-0.5,
        prompt_query_block=None, prompt_kernel=kernel, device="cpu", dtype=dtype,
        attn_softcap=None,
    )  # fmt: skip


def shapes_of(dtype_body: str) -> list[tuple[int, int, int]]:
    return SHAPES + FLOAT_SHAPES if dtype_body == "float" else SHAPES


def filled_cache(m: SimpleNamespace, length: int) -> KVCache:
    """One sequence's keys and values (slot 0), random."""
    cache = KVCache(1, 1, m.num_kv_heads, 2048, m.head_dim, m.dtype, "cpu")
    cache.reserve(length, 0)
    cache.ensure_slots(1, 0)
    generator = torch.Generator().manual_seed(1)
    cache.keys_t[0].copy_(torch.randn(cache.keys_t[0].shape, generator=generator))
    cache.values[0].copy_(torch.randn(cache.values[0].shape, generator=generator))
    return cache


def mask(start: int, rows: int, length: int, window: int | None = None) -> torch.Tensor:
    """Rows at positions start.. over `length` keys: causal, and within `window` if given."""
    positions = torch.arange(start, start + rows)[:, None]
    keys = torch.arange(length)[None, :]
    hidden = keys > positions
    if window is not None:
        hidden |= keys <= positions - window
    return torch.zeros(rows, length, dtype=torch.bfloat16).masked_fill(hidden, MINUS_INF)


def ring_mask(start: int, rows: int, ring: int, window: int) -> torch.Tensor:
    """A sliding-window layer's ring (DecoderModel.mask): position p's key at index p mod
    ring, visible when at most window - 1 back and not before the start: the visible
    indexes wrap around the ring's end."""
    positions = torch.arange(start, start + rows)[:, None]
    back = (positions - torch.arange(ring)[None, :]) % ring
    hidden = (back >= window) | (back > positions)
    return torch.zeros(rows, ring, dtype=torch.bfloat16).masked_fill(hidden, MINUS_INF)


def queries(m: SimpleNamespace, rows: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(rows, m.num_heads, m.head_dim, generator=generator).to(m.dtype)


def chunk(m, cache, q, start: int, end: int, window=None, threads=None) -> torch.Tensor:
    """The kernel's attention for rows start..end of the prompt (keys up to end)."""
    keys_t, values = cache.prompt_view(0, 0, end)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return attention_prompt.attend(
            m, q[start:end], keys_t, values, mask(start, end - start, end, window)
        )
    finally:
        torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize(("heads", "kv_heads", "d"), SHAPES + FLOAT_SHAPES)
@pytest.mark.parametrize("window", [None, 40])
def test_a_prompt_row_is_a_decode_step_at_its_position(heads, kv_heads, d, window, body):
    """Rows at positions 0..300 (around every multiple of 16, 8 and 2, the last key odd or
    even) against the decode kernel over the same keys, one row at a time."""
    m = model(heads, kv_heads, d, dtype=body)
    cache = filled_cache(m, 301)
    q = queries(m, 301)
    whole = chunk(m, cache, q, 0, 301, window)
    for p in [0, 1, 2, 7, 8, 9, 14, 15, 16, 17, 31, 32, 33, 100, 299, 300]:
        keys_t, values = cache.keys_t[0], cache.values[0]
        plan = RowsPlan(p + 1, mask(p, 1, p + 1, window).float(), torch.tensor([p]))
        # the row's own key and value written again where they already are
        decoded = attention_rows.attend(
            m, 0, q[p : p + 1], keys_t[0:1, :, :, p], values[0:1, :, p], cache, plan
        )
        assert torch.equal(whole[p], decoded[0]), p


@needs_kernel
@pytest.mark.parametrize(("heads", "kv_heads", "d"), SHAPES[:2])
def test_a_prompt_rows_bits_depend_on_its_own_keys_alone(heads, kv_heads, d, body):
    """Whole == in chunks of 37 (each over its own extent) == over a longer extent whose
    extra keys are masked (a bf16 or a float32 mask) == on one thread, with and without a
    sliding window; and a ring layer's wrapped keys as decode reads them."""
    m = model(heads, kv_heads, d, dtype=body)
    cache = filled_cache(m, 416)
    q = queries(m, 400)
    for window in (None, 64):
        whole = chunk(m, cache, q, 0, 400, window)
        parts = [chunk(m, cache, q, lo, min(400, lo + 37), window) for lo in range(0, 400, 37)]
        assert torch.equal(torch.cat(parts), whole)
        assert torch.equal(chunk(m, cache, q, 0, 400, window, threads=1), whole)
        keys_t, values = cache.prompt_view(0, 0, 416)  # 16 keys past the prompt, masked
        padded = torch.cat((mask(0, 400, 400, window), mask(0, 400, 16).fill_(MINUS_INF)), 1)
        assert torch.equal(attention_prompt.attend(m, q, keys_t, values, padded), whole)
        assert torch.equal(attention_prompt.attend(m, q, keys_t, values, padded.float()), whole)
    # a ring layer's keys (ring 96, window 64; positions 300..399 in chunks of 37): each row
    # the bits of a decode step at its index over the same ring, the visible indexes wrapping
    keys_t, values = cache.prompt_view(0, 0, 96)
    for lo in range(300, 400, 37):
        hi = min(400, lo + 37)
        got = attention_prompt.attend(m, q[lo:hi], keys_t, values, ring_mask(lo, hi - lo, 96, 64))
        for i in (0, hi - lo - 1):
            p = lo + i
            bias = ring_mask(p, 1, 96, 64).float()
            plan = RowsPlan(96, bias, torch.tensor([p % 96]))
            k, v = cache.keys_t[0][0:1, :, :, p % 96], cache.values[0][0:1, :, p % 96]
            decoded = attention_rows.attend(m, 0, q[p : p + 1], k, v, cache, plan)
            assert torch.equal(got[i], decoded[0]), p


@needs_kernel
@pytest.mark.parametrize(("heads", "kv_heads", "d"), SHAPES)
def test_the_kernel_is_no_further_from_exact_attention_than_torchs_route(heads, kv_heads, d, body):
    """Against attention computed in float64 from the same inputs: the kernel's error is
    within the dtype's rounding and no larger than that of torch's route (Hugging Face's
    eager ops in the same dtype)."""
    m = model(heads, kv_heads, d, dtype=body)
    cache = filled_cache(m, 200)
    q = queries(m, 200)
    keys_t, values = cache.prompt_view(0, 0, 200)
    bias = mask(0, 200, 200).to(body)
    kernel = attention_prompt.attend(m, q, keys_t, values, bias)
    torch_model = model(heads, kv_heads, d, kernel=False, dtype=body)
    torch_route = prompt_attention(torch_model, q, keys_t, values, bias)
    group = heads // kv_heads
    k64 = keys_t.double().repeat_interleave(group, 0)  # [heads, d, keys]
    v64 = values.double().repeat_interleave(group, 0)
    scores = torch.einsum("rhd,hdk->hrk", q.double(), k64) * m.scale + bias.double()[None]
    exact = torch.einsum("hrk,hkd->rhd", scores.softmax(-1), v64).reshape(200, -1)
    kernel_error = (kernel.double() - exact).abs().max().item()
    torch_error = (torch_route.double() - exact).abs().max().item()
    assert kernel_error < (2e-2 if body is torch.bfloat16 else 1e-5)
    assert kernel_error <= 1.25 * torch_error + (1e-3 if body is torch.bfloat16 else 1e-6)


def test_engine_prompt_attention_chooses_the_route(tiny, tiny_bf16, monkeypatch):  # noqa: F811
    """auto: the kernel wherever it runs (a CPU, bf16 or float32, head_dim a multiple of 16,
    the kernels built), torch's route elsewhere; 'kernel' where it cannot run is an error,
    not a fallback; 'torch' never takes it. The engine's info says which, and the body is
    decode's: bf16 pairs on AVX-512 BF16 with head_dim a multiple of 32, else float lanes."""
    built = native.unavailable_reason() is None
    for loaded in (tiny, tiny_bf16):  # head_dim 16: the float body
        runner = CompactRunner(loaded, EngineConfig(weights="dense"), max_seq_len=128)
        assert runner.model.prompt_kernel is built
        assert runner.kernels()["prompt_attention"] == ("kernel" if built else "torch")
        pinned = EngineConfig(weights="dense", prompt_attention="torch")
        assert CompactRunner(loaded, pinned, max_seq_len=128).kernels()["prompt_attention"] == (
            "torch"
        )
    bundled = model(9, 3, 64)
    for unfit in (
        SimpleNamespace(device="cpu", dtype=torch.float16, head_dim=64),
        SimpleNamespace(device="cpu", dtype=torch.bfloat16, head_dim=40),
        SimpleNamespace(device="cuda:0", dtype=torch.bfloat16, head_dim=64),
        SimpleNamespace(device="cpu", dtype=torch.bfloat16, head_dim=64, attn_softcap=50.0),
    ):
        assert not attention_prompt.resolve("auto", unfit)
        with pytest.raises(ValueError, match="cannot run here"):
            attention_prompt.resolve("kernel", unfit)
    assert not attention_prompt.resolve("torch", bundled)
    monkeypatch.setattr(native, "attention_pairs", lambda: True)
    assert attention_prompt.uses_pairs(bundled)
    assert not attention_prompt.uses_pairs(model(9, 3, 64, dtype=torch.float32))
    assert not attention_prompt.uses_pairs(model(4, 2, 48))
    monkeypatch.setattr(native, "attention_pairs", lambda: False)  # a CPU without AVX-512 BF16
    assert not attention_prompt.uses_pairs(bundled)
    assert attention_prompt.resolve("auto", bundled) is built
    monkeypatch.setattr(native, "unavailable_reason", lambda: "no compiler")  # kernels unbuilt
    assert attention_prompt.unsupported_reason(bundled) == "no compiler"
    assert not attention_prompt.resolve("auto", bundled)
    with pytest.raises(ValueError, match=r"engine\.prompt_attention=kernel cannot run here"):
        CompactRunner(
            tiny, EngineConfig(weights="dense", prompt_attention="kernel"), max_seq_len=128
        )
    with pytest.raises(ValueError, match="cannot run here"):  # never called into the kernel
        q = queries(bundled, 4)
        attention_prompt.attend(
            bundled, q, *filled_cache(bundled, 4).prompt_view(0, 0, 4), mask(0, 4, 4)
        )


@needs_kernel
def test_the_kernel_refuses_what_would_take_it_past_its_buffers():
    """A mask that is not 0/-inf floats (a bool mask would turn True into +1 in the
    softmax), q rows other than the mask's, keys or values of other shapes: clear errors."""
    m = model(9, 3, 64)
    cache = filled_cache(m, 40)
    q = queries(m, 40)
    keys_t, values = cache.prompt_view(0, 0, 40)
    good = mask(0, 40, 40)
    for bad in (
        (q, keys_t, values, good.isinf()),
        (q[:30], keys_t, values, good),
        (q, keys_t[:, :, :39], values, good),
        (q, keys_t, values[:2], good),
        (q.float(), keys_t, values, good),
    ):
        with pytest.raises(ValueError, match="prompt attention"):
            attention_prompt.attend(m, *bad)


@needs_kernel
def test_the_bundled_model_serves_prompts_through_the_kernel_as_through_torch():
    """The bundled SmolLM2 as served (auto: the kernel) against `prompt_attention: torch`:
    the next-token distributions of prompts of 40 to 1,200 tokens agree to bf16 rounding
    through 30 layers (KL under 0.05: the two GEMM blockings of torch's own route differ by
    0.01-0.015 on these prompts on AMX), and its info says which route ran."""
    from ragtune.config import ModelConfig, default_home
    from ragtune.models import load_base_model
    from tests.engine.test_prompt_gemm import first_logits

    loaded = load_base_model(
        ModelConfig(source="bundled"), default_home(), packs_projections=True
    )  # as served
    kernel = CompactRunner(loaded, EngineConfig(), max_seq_len=2048)
    route = CompactRunner(loaded, EngineConfig(prompt_attention="torch"), max_seq_len=2048)
    assert kernel.kernels()["prompt_attention"] == "kernel"
    assert route.kernels()["prompt_attention"] == "torch"
    generator = torch.Generator().manual_seed(5)
    for n in (40, 300, 1200):
        prompt = torch.randint(100, 40000, (n,), generator=generator).tolist()
        ours = first_logits(kernel, [prompt])[0].log_softmax(-1)
        theirs = first_logits(route, [prompt])[0].log_softmax(-1)
        assert (theirs.exp() * (theirs - ours)).sum() < 0.05
        assert (theirs.exp() - ours.exp()).abs().max() < 0.02
