"""Decode attention on ragtune's kernel (server/engine/attention_rows.py, csrc/
attention_rows.cpp): it writes each row's new key and value where the row says, computes
Hugging Face's eager attention (torch's route to rounding), and a row's bits depend on its
own keys alone: not on its neighbours, the step's longest extent or the thread count. The
engine's tokens on this route against Hugging Face and PEFT are in test_families.py and
test_runner.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from server.engine import attention_rows, native
from server.engine.attention_rows import RowsPlan
from server.engine.kv_cache import KVCache
from server.engine.models.attention import attention

pytestmark = pytest.mark.skipif(
    native.unavailable_reason() is not None, reason=f"kernels: {native.unavailable_reason()}"
)
MINUS_INF = float("-inf")
# the float path on every CPU; bf16 pairs where the CPU has AVX-512 BF16
PATHS = [
    (torch.float32, False),
    (torch.bfloat16, False),
    pytest.param(
        (torch.bfloat16, True),
        marks=pytest.mark.skipif(
            native.unavailable_reason() is not None
            or not native.library().attention_pairs_supported(),
            reason="no AVX-512 BF16 here",
        ),
        id="bf16-pairs",
    ),
]


@pytest.fixture
def path(request, monkeypatch) -> torch.dtype:
    """(dtype, bf16 pairs): the kernel's path, forced."""
    dtype, pairs = request.param
    monkeypatch.setattr(native, "attention_pairs", lambda: pairs)
    return dtype


def model(heads: int, kv_heads: int, d: int) -> SimpleNamespace:
    return SimpleNamespace(
        head_dim=d,
        num_heads=heads,
        num_kv_heads=kv_heads,
        q_size=heads * d,
        scale=d**-0.5,
        attn_softcap=None,
    )


def filled_cache(m: SimpleNamespace, rows: int, length: int, dtype: torch.dtype) -> KVCache:
    cache = KVCache(1, rows, m.num_kv_heads, 256, m.head_dim, dtype, "cpu")
    cache.reserve(length, 0)
    cache.ensure_slots(rows, 0)
    generator = torch.Generator().manual_seed(1)
    cache.keys_t[0].copy_(torch.randn(cache.keys_t[0].shape, generator=generator))
    cache.values[0].copy_(torch.randn(cache.values[0].shape, generator=generator))
    return cache


def causal(positions: list[int], length: int) -> torch.Tensor:
    keys = torch.arange(length)[None, :]
    hidden = keys > torch.tensor(positions)[:, None]
    return torch.zeros(hidden.shape).masked_fill(hidden, MINUS_INF)


def step(m, cache, positions, length, bias=None, threads=None):
    """One kernel call for rows at `positions` (their new keys written at their position)."""
    generator = torch.Generator().manual_seed(2)
    rows, d = len(positions), m.head_dim
    q = torch.randn(rows, m.num_heads, d, generator=generator).to(cache.dtype)
    k = torch.randn(rows, m.num_kv_heads, d, generator=generator).to(cache.dtype)
    v = torch.randn(rows, m.num_kv_heads, d, generator=generator).to(cache.dtype)
    bias = causal(positions, length) if bias is None else bias
    plan = RowsPlan(length, bias.contiguous(), torch.tensor(positions, dtype=torch.int64))
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        out = attention_rows.attend(m, 0, q, k, v, cache, plan)
    finally:
        torch.set_num_threads(before)
    return q, k, v, out


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "d"), [(2, 2, 16), (9, 3, 64), (4, 1, 256), (20, 2, 32)]
)
def test_the_kernel_writes_the_new_keys_and_attends_as_torch_does(path, heads, kv_heads, d):
    """Groups of 1, 3, 4 and 10 query heads per KV head (more than the kernel takes at
    once), head sizes 16 to 256, rows of 1 to 45 keys (not multiples of 8 or 16)."""
    dtype = path
    m = model(heads, kv_heads, d)
    positions = [44, 0, 7, 20]
    cache = filled_cache(m, 4, 45, dtype)
    q, k, v, out = step(m, cache, positions, 45)
    keys_t, values = cache.keys_t[0], cache.values[0]
    group = heads // kv_heads
    for row, position in enumerate(positions):
        assert torch.equal(keys_t[row, :, :, position], k[row])
        assert torch.equal(values[row, :, position], v[row])
        expected = attention(
            q[row].view(kv_heads, group, d),
            keys_t[row, :, :, : position + 1],
            values[row, :, : position + 1],
            torch.zeros(1, 1, position + 1, dtype=dtype),
            m.scale,
        ).reshape(-1)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[row], expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_a_rows_bits_depend_on_its_own_keys_alone(path):
    """Alone over its own keys == among rows of other lengths over the longest extent ==
    over a longer, masked extent, with one thread or two; a ring layer's wrapped keys
    likewise (index order, masked by how far back each lies)."""
    dtype = path
    m = model(9, 3, 64)
    positions = [60, 3, 17, 31]
    batched = step(m, filled_cache(m, 4, 96, dtype), positions, 61)[3]
    for row, position in enumerate(positions):
        for length, threads in ((position + 1, 2), (96, 1)):
            cache = filled_cache(m, 4, 96, dtype)
            # the same row alone: its own q, k, v (row `row` of the batch's draws), slot `row`
            bias = causal(positions, length)
            alone = step(m, cache, positions, length, bias, threads)[3]
            assert torch.equal(alone[row], batched[row])
    ring, window = 32, 20
    wrapped = [40, 45]  # position p at index p % ring; visible: the last `window` positions
    back = (torch.tensor(wrapped)[:, None] - torch.arange(ring)[None, :]) % ring
    bias = torch.zeros(2, ring).masked_fill(back >= window, MINUS_INF)
    indexes = [p % ring for p in wrapped]
    outs = []
    for threads in (1, 2):
        cache = filled_cache(m, 2, ring, dtype)
        q, _, _, out = step(m, cache, indexes, ring, bias, threads)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    visible = (back[1] < window).nonzero().flatten()
    keys_t, values = cache.keys_t[0][1], cache.values[0][1]
    expected = attention(
        q[1].view(3, 3, 64),
        keys_t[:, :, visible],
        values[:, visible],
        torch.zeros(1, 1, len(visible), dtype=dtype),
        m.scale,
    ).reshape(-1)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[1][1], expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "d", "rotary_dim"),
    [(9, 3, 64, 64), (4, 1, 256, 256), (4, 2, 64, 32), (2, 2, 32, 24)],  # full, partial, odd half
)
def test_the_kernel_rotates_q_and_k_as_layer_arithmetic_does(path, heads, kv_heads, d, rotary_dim):
    """With the step's cos and sin the kernel turns q and the new keys itself: the keys it
    writes and the attention it returns are those of LayerArithmetic._rotate's bf16/float32
    ops before an unrotating call, bit for bit (halves of 16 and 12 features: the vector and
    the one-at-a-time paths), the features past rotary_dim untouched."""
    from server.engine.models.layer import LayerArithmetic

    dtype = path
    m = model(heads, kv_heads, d)
    m.rotary_dim = rotary_dim
    generator = torch.Generator().manual_seed(3)
    positions = [30, 0, 7, 19]
    angles = torch.rand(4, rotary_dim // 2, generator=generator) * 6.0
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1).to(dtype)[:, None, :]
    half = angles.sin()
    sin = torch.cat((-half, half), dim=-1).to(dtype)[:, None, :]
    q = torch.randn(4, heads, d, generator=generator).to(dtype)
    k = torch.randn(4, kv_heads, d, generator=generator).to(dtype)
    v = torch.randn(4, kv_heads, d, generator=generator).to(dtype)
    plan = RowsPlan(31, causal(positions, 31).contiguous(), torch.tensor(positions))
    turned = SimpleNamespace(rotary_dim=rotary_dim, head_dim=d)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        return LayerArithmetic._rotate(turned, x, cos, sin)

    turned._rotate_all = LayerArithmetic._rotate_all
    expected_cache, kernel_cache = filled_cache(m, 4, 31, dtype), filled_cache(m, 4, 31, dtype)
    expected = attention_rows.attend(m, 0, rotate(q), rotate(k), v, expected_cache, plan)
    out = attention_rows.attend(m, 0, q, k, v, kernel_cache, plan, (cos, sin))
    assert torch.equal(kernel_cache.keys_t[0], expected_cache.keys_t[0])
    assert torch.equal(out, expected)
    if rotary_dim < d:  # the unturned features as they came
        for row, position in enumerate(positions):
            assert torch.equal(
                kernel_cache.keys_t[0][row, :, rotary_dim:, position], k[row, :, rotary_dim:]
            )
