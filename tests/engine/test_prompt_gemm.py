"""Prompt chunks' dense GEMM (server/engine/prompt_gemm.py): a lone row is computed as the
first of two, so it takes the GEMM's many-row path. Where two-row and many-row calls agree on
a row (what the start-up check, models/exactness.py, needs for batched prefill and the prefix
cache), a one-row chunk must agree too: oneDNN's bf16 GEMM summed a lone row in another
order on an AVX-512 BF16 EPYC, which turned both features off there. Where they do not agree
(oneDNN's AMX kernels pick their blocking by the row count), fixed row blocks make every row
independent of its chunk, and the start-up check keeps them only then."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.engine import native
from server.engine.a8 import A8Linear
from server.engine.linear import DenseLinear, Int4Linear, Int8Linear, W8A8Layer, W8A8Linear
from server.engine.models.attention import PROMPT_QUERY_BLOCK
from server.engine.models.exactness import wide_weights
from server.engine.prompt_gemm import (
    ROW_BLOCK,
    row_blocks_supported,
    team_exact_block,
    wide_linear,
)
from server.engine.runner import CompactRunner
from tests.engine.test_runner import tiny, tiny_bf16  # noqa: F401  (fixtures)

# (out, in): SmolLM2's down projection (the shape that showed it), and its q projection
SHAPES = [(576, 1536), (576, 576)]


def kinds() -> list[tuple[str, object]]:
    found = [("dense", DenseLinear), ("int8", Int8Linear), ("int4", Int4Linear)]
    if W8A8Linear.supported():
        found.append(("w8a8", W8A8Linear))
    if native.unavailable_reason() is None:
        found.append(("a8", lambda weight: A8Linear(weight, bits=8)))
    return found


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_a_lone_row_is_the_first_of_two(dtype, out_features, in_features):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    x = torch.randn(3, in_features, generator=generator).to(dtype)
    lone = wide_linear(x[:1], weight)
    assert lone.shape == (1, out_features)
    assert torch.equal(lone, F.linear(x[:1].expand(2, -1).contiguous(), weight)[:1])
    assert torch.equal(wide_linear(x, weight), F.linear(x, weight))  # more rows: unchanged
    assert wide_linear(x[:1].view(1, 1, -1), weight).shape == (1, 1, out_features)


@pytest.mark.parametrize(("name", "kind"), kinds())
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_a_one_row_prompt_chunk_has_a_many_row_chunks_bits(name, kind, out_features, in_features):
    """Many draws: the lone-row path differed from the many-row one on a few rows in a
    hundred (SmolLM2's down projection, 15 of 320), not on every row."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    linear = kind(weight)
    for _ in range(12):
        x = torch.randn(64, in_features, generator=generator).bfloat16()
        many = linear(x, wide=True)
        rows = range(0, 64, 8)
        if any(not torch.equal(linear(x[r : r + 2], wide=True)[:1], many[r : r + 1]) for r in rows):
            pytest.skip(
                f"{name}: this CPU's GEMM gives two rows other bits than 64 (checked at "
                "start-up, where row blocks take over: the next test)"
            )
        for row in rows:
            lone = linear(x[row : row + 1], wide=True)
            assert torch.equal(lone, many[row : row + 1]), (name, row)


def prompt_kinds() -> list[tuple[str, object]]:
    """The kinds with a prompt GEMM (the vocabulary projection's W8A8Linear has none)."""
    found = [(name, kind) for name, kind in kinds() if name != "w8a8"]
    return found + ([("w8a8", W8A8Layer)] if W8A8Linear.supported() else [])


needs_blocks = pytest.mark.skipif(
    not row_blocks_supported(torch.bfloat16), reason="no oneDNN prepacked bf16 linear"
)


@needs_blocks
@pytest.mark.parametrize("block", [ROW_BLOCK, ROW_BLOCK // 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("name", "kind"), prompt_kinds())
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_row_blocks_give_each_row_the_same_bits_in_any_chunk(
    name, kind, out_features, in_features, dtype, block
):
    """In blocks, a row's bits depend neither on the rows beside it nor on how many share its
    chunk (one, two, a block and one, several blocks), and the product is the dense one."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    linear = kind(weight)
    plain = linear.wide.dense().clone()
    linear.wide.use_row_blocks(True, block)
    x = torch.randn(3 * block + 5, in_features, generator=generator).to(dtype)
    whole = linear(x, wide=True)
    assert whole.shape == (x.shape[0], out_features)
    for lo, hi in ((0, 1), (0, 2), (7, 8), (3, 40), (1, block + 2), (50, x.shape[0])):
        assert torch.equal(linear(x[lo:hi], wide=True), whole[lo:hi]), (name, lo, hi)
    assert linear(x[:3].view(1, 3, -1), wide=True).shape == (1, 3, out_features)
    tolerance = (
        {"rtol": 0.02, "atol": 0.02} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-3}
    )
    torch.testing.assert_close(whole.float(), F.linear(x, plain).float(), **tolerance)
    linear.wide.drop_plain()
    assert torch.equal(linear(x[5:9], wide=True), whole[5:9])
    with pytest.raises(RuntimeError, match="freed"):
        linear.wide.dense()


@pytest.mark.parametrize(("out_features", "in_features"), [*SHAPES, (640, 2048)])
def test_the_blocks_chosen_for_a_shrinking_team_keep_their_bits_at_every_size(
    out_features, in_features
):
    """(640, 2048): Gemma 3's down projection, which oneDNN's AMX kernels split among two
    threads in blocks of 128 rows on the Xeon measured."""
    if not row_blocks_supported(torch.bfloat16):
        pytest.skip("no oneDNN prepacked bf16 linear here")
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    before = torch.get_num_threads()
    block = team_exact_block(weight, 2)
    assert block in (ROW_BLOCK, ROW_BLOCK // 2, ROW_BLOCK // 4)
    assert torch.get_num_threads() == before
    wide = DenseLinear(weight).wide
    wide.use_row_blocks(True, block)
    x = torch.randn(3 * block + 5, in_features, generator=generator).bfloat16()
    try:
        torch.set_num_threads(2)
        two = wide(x)
        torch.set_num_threads(1)
        one = wide(x)
    finally:
        torch.set_num_threads(before)
    if block == ROW_BLOCK and not torch.equal(one, two):
        pytest.skip("no block keeps this shape's bits here: the team's probe keeps the team")
    assert torch.equal(one, two)


def first_logits(runner: CompactRunner, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Each prompt's first-token logits, the prompts prefilled together (sharing forwards
    where the runner allows), chunk by chunk."""
    from tests.engine.test_runner import sequence

    seqs = [sequence(prompt) for prompt in prompts]
    for seq in seqs:
        runner.add(seq)
    done: dict[int, torch.Tensor] = {}
    while len(done) < len(seqs):
        waiting = [i for i in range(len(seqs)) if i not in done]
        for i, logits in zip(waiting, runner.prefill([seqs[i] for i in waiting]), strict=True):
            if logits is not None:
                done[i] = logits.clone()
    for seq in seqs:
        runner.release(seq)
    return [done[i] for i in range(len(seqs))]


def flat(layers: list[list]) -> list:
    return [weight for layer in layers for weight in layer]


@needs_blocks
def test_where_plain_prompt_gemms_fail_the_check_row_blocks_take_over(request, monkeypatch):
    """Any CPU, as on one whose GEMMs sum by the row count (AMX): the first check fails.
    Where this CPU's attention is exact over padded keys, blocks take over (every layer, plain
    copies freed), the runner wires prompts as on row-independent devices (shared forwards,
    prefix cache, keys padded, no row padding) and decode as on row-count-dependent ones, and
    a prompt's logits are bit-identical whole and chunked; elsewhere blocks are undone."""
    from ragtune.config import EngineConfig
    from server.engine.models import exactness

    real, calls = exactness.gemm_rows_independent, []

    def first_fails(model) -> bool:
        calls.append(model)
        return len(calls) > 1 and real(model)

    monkeypatch.setattr(exactness, "gemm_rows_independent", first_fails)
    loaded = request.getfixturevalue("tiny_bf16")
    weights = "w4a8" if native.unavailable_reason() is None else "int4"

    def runner(chunk: int) -> CompactRunner:
        calls.clear()
        # torch's route: the query blocks and padded keys row blocks wire up for it
        config = EngineConfig(weights=weights, prefill_chunk=chunk, prompt_attention="torch")
        return CompactRunner(loaded, config, max_seq_len=128)

    whole = runner(512)
    m = whole.model
    blocked = [w.packed is not None for w in flat(wide_weights(m))]
    if not m.row_blocks:  # undone: only where this CPU's attention is not exact as needed
        assert not m.rows_independent and not any(blocked) and m.prompt_query_block is None
        assert all(w.source is not None for w in flat(wide_weights(m)))
        m.prompt_query_block = PROMPT_QUERY_BLOCK
        exact = exactness.padded_extents_exact(m, 128).values
        assert not (exact and exactness.prompt_attention_exact(m, 128))
        pytest.skip("attention here is not exact over padded keys: blocks undone (asserted)")
    assert m.rows_independent and all(blocked)
    assert all(w.source is None for w in flat(wide_weights(m)))
    assert m.fixed_decode_rows and m.prefill_row_multiple is None
    assert m.prompt_query_block == PROMPT_QUERY_BLOCK
    assert m.prompt_key_multiple == exactness.PROMPT_KEY_MULTIPLE
    assert whole.prefix_cache is not None and whole.lora.dtype == torch.float32
    assert whole.kernels()["prompt_gemm"] == f"blocks of {ROW_BLOCK}"
    prompts = [[1 + (t * 7 + i) % 100 for t in range(n)] for i, n in enumerate((90, 41, 3))]
    alone = [first_logits(whole, [prompt])[0] for prompt in prompts]
    for prefilled in (first_logits(whole, prompts), first_logits(runner(16), prompts)):
        assert all(torch.equal(a, b) for a, b in zip(alone, prefilled, strict=True))


@needs_blocks
def test_prompt_row_blocks_false_never_blocks(request, monkeypatch):
    from ragtune.config import EngineConfig
    from server.engine.models import exactness

    monkeypatch.setattr(exactness, "gemm_rows_independent", lambda model: False)
    config = EngineConfig(weights="dense", prompt_row_blocks=False)
    off = CompactRunner(request.getfixturevalue("tiny_bf16"), config, max_seq_len=128)
    assert not off.model.row_blocks and not off.model.rows_independent
    assert off.kernels()["prompt_gemm"] == "plain" and off.prefix_cache is None
    assert all(w.packed is None for w in flat(wide_weights(off.model)))


@pytest.mark.parametrize(
    ("source", "route"),
    [
        ("bundled", "auto"),
        # torch's prompt attention (on AMX its query blocks over padded keys hold the bits)
        pytest.param("bundled", "torch", marks=pytest.mark.slow),
        pytest.param("bundled:gemma-3-270m", "auto", marks=pytest.mark.slow),
    ],
)
def test_the_bundled_models_prefill_the_same_bits_in_any_chunking(source, route):
    """The real models as served (their auto weights and dtype, row blocks wherever the
    start-up check takes them), wherever the server reuses prefixes (rows independent): a
    prompt's first-token logits are bit-identical prefilled alone, beside other prompts in
    shared forwards, in 48-token chunks, and past 1,024 tokens with its first 1,000 restored
    from the prefix cache. Through the prompt attention kernel where it runs (its rows
    depend on their own keys alone) and through torch's route (slow: on AMX the value GEMM
    over 1,000+ keys sums a row by the query count, and fixed query blocks hold it)."""
    from ragtune.config import EngineConfig, ModelConfig, default_home
    from ragtune.models import load_base_model

    loaded = load_base_model(
        ModelConfig(source=source), default_home(), packs_projections=True
    )  # as served
    whole = CompactRunner(loaded, EngineConfig(prompt_attention=route), max_seq_len=2048)
    if not whole.model.rows_independent:
        pytest.skip("this CPU's prompt rows depend on the chunking: no prefix reuse here")
    prompts = [[100 + (t * 13 + i) % 9000 for t in range(n)] for i, n in enumerate((333, 61, 200))]
    alone = [first_logits(whole, [prompt])[0] for prompt in prompts]
    chunked = CompactRunner(
        loaded, EngineConfig(prefill_chunk=48, prompt_attention=route), max_seq_len=2048
    )
    for runner in (whole, chunked):
        for expected, got in zip(alone, first_logits(runner, prompts), strict=True):
            assert torch.equal(expected, got)
    long = torch.randint(100, 40000, (1500,), generator=torch.Generator().manual_seed(3)).tolist()
    cold = first_logits(
        CompactRunner(loaded, EngineConfig(prompt_attention=route), max_seq_len=2048), [long]
    )[0]
    first_logits(whole, [long[:1000]])  # its blocks stored in the prefix cache
    assert whole.prefix_cache is not None
    assert torch.equal(first_logits(whole, [long])[0], cold)
    if not whole.model.windows[-1]:  # no sliding window: 48-token chunks keep the same ring
        assert torch.equal(first_logits(chunked, [long])[0], cold)
