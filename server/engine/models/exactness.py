"""Start-up checks of which kernels give a row the same bits whatever shares its call, run on
this device with the model's own shapes. The forward picks its batching from them: a check
that fails costs speed (rows computed apart), never a row's result depending on its batch
neighbours."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.engine.kv_cache import extent_classes
from server.engine.linear import DenseLinear
from server.engine.models.attention import PROMPT_QUERY_BLOCK, prompt_attention
from server.engine.prompt_gemm import WideWeight, row_blocks_supported, team_exact_block

if TYPE_CHECKING:
    from server.engine.models.base import DecoderModel

logger = logging.getLogger(__name__)

# Prompt chunks above this many tokens run packed weights dequantized (dense GEMM): one chunk
# alone breaks even at ~24 tokens (int4 23.2 ms, dense 22.6), prompts sharing a forward gain more.
WIDE_ROWS = 24
# The longest key extent padded_extents_exact checks (its buffers grow with the square)
CHECKED_EXTENT = 4096
# The LoRA rank the check multiplies prompt rows by (engine.max_lora_rank's default), in each
# fused group's shapes (lora_apply.add_lora: a group's factors side by side)
LORA_CHECK_RANK = 16
# Rows of the check's many-row prompt calls: a shared forward holds up to
# engine.max_batch_tokens (1,024) rows
WIDE_CHECK_ROWS = 1088
# Where prompt rows are made independent on a device that sums by the row count (row
# blocks), prompt attention runs over keys rounded up to this multiple (masked), so a row's
# sums over keys do not change with where its chunk ends (runner.py, passes.prompt_keys)
PROMPT_KEY_MULTIPLE = 32


def gemm_rows_independent(model: DecoderModel) -> bool:
    """Whether every GEMM of the forward gives a row the same bits whatever other rows share
    the call, so that prompts can be prefilled together without changing any of them. True
    of oneDNN's bf16 GEMM and of the packed kernels on the CPUs measured here, but a kernel
    may pick its summation order by the row count (split-K GEMMs on GPUs, oneDNN's one-row
    path on some CPUs), so it is checked on this device, with the model's own weights."""
    generator = torch.Generator().manual_seed(0)

    def same_rows(linear, in_features: int, wide: bool, rows: int, slices) -> bool:
        x = torch.randn(rows, in_features, generator=generator).to(model.dtype)
        x = x.to(model.device)
        full = linear(x, wide)
        return all(torch.equal(linear(x[lo:hi], wide), full[lo:hi]) for lo, hi in slices)

    layer = model.layers[0]
    shapes = (
        (layer.qkv, model.hidden),
        (layer.o, model.num_heads * model.head_dim),
        (layer.gate_up, model.hidden),
        (layer.down, model.intermediate),
    )
    narrow = ((0, 1), (0, 2), (5, 5 + WIDE_ROWS), (64, 96))
    # a wide prompt's last chunk may be one row (the rest restored from the prefix cache)
    wide = ((0, 1), (0, 2), (3, 10), (0, WIDE_ROWS + 1), (100, 300), (470, 512), (0, 600))
    # LoRA's prompt rows are the whole forward's (two or more: a lone row is a one-token
    # prompt alone, whose one-row GEMM path nothing else shares)
    lora_wide = wide[1:]

    def dense(out_features: int, in_features: int) -> DenseLinear:  # LoRA A and B shapes
        weight = torch.randn(out_features, in_features, generator=generator)
        return DenseLinear(weight.to(model.dtype).to(model.device))

    def lora_prompt(in_features: int, columns: int):  # add_lora's GEMM on prompt rows
        factor = torch.randn(in_features, columns, generator=generator)
        factor = factor.to(model.dtype).to(model.device)
        return lambda x, wide: x @ factor

    rows = WIDE_CHECK_ROWS
    return (
        all(same_rows(linear, n, False, 96, narrow) for linear, n in shapes)
        and all(same_rows(linear, n, True, rows, wide) for linear, n in shapes)
        and same_rows(model.lm_head, model.hidden, False, 16, ((0, 1), (3, 9)))
        and same_rows(dense(64, model.hidden), model.hidden, False, 96, narrow)
        and same_rows(dense(model.hidden, 64), 64, False, 96, narrow)
        and all(
            same_rows(lora_prompt(n, m), n, True, rows, lora_wide)
            for n, m in lora_factor_shapes(model)
        )
    )


def lora_factor_shapes(model: DecoderModel) -> list[tuple[int, int]]:
    """(in, out) of each fused group's A then B factors at LORA_CHECK_RANK, as LoraSlots lays
    them out (lora_apply.add_lora: a group's factors side by side)."""
    from server.engine.models.base import module_shapes  # base imports this module

    by_module, shapes = module_shapes(model), set()
    for modules in model.LORA_GROUPS.values():
        width = len(modules) * LORA_CHECK_RANK
        shapes.add((by_module[modules[0]][0], width))
        shapes.add((width, sum(by_module[m][1] for m in modules)))
    return sorted(shapes)


def prompt_attention_exact(
    model: DecoderModel, max_len: int, length: int = 1600, key_multiple: int = PROMPT_KEY_MULTIPLE
) -> bool:
    """Whether a prompt's attention rows come out the same computed whole and in chunks
    (other query counts, other ends), each call over keys rounded up to `key_multiple`
    and masked past the row's position, with the model's head shapes in the cache's layout
    (what prefix reuse needs of attention where the GEMMs sum by the row count)."""
    generator = torch.Generator().manual_seed(2)
    kv, d, device = model.num_kv_heads, model.head_dim, model.device
    length = min(length, max_len)
    extent = min(max_len, length + PROMPT_KEY_MULTIPLE)

    def drawn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(model.dtype).to(device)

    keys_t, values, q = (
        drawn(kv, d, extent),
        drawn(kv, extent, d),
        drawn(length, model.num_heads, d),
    )

    def rows(lo: int, hi: int) -> torch.Tensor:
        end = min(-(-hi // key_multiple) * key_multiple, extent)
        mask = model.mask(torch.arange(lo, hi, device=device), end, None)
        return prompt_attention(model, q[lo:hi], keys_t[:, :, :end], values[:, :end], mask)

    whole = rows(0, length)
    cuts = (
        (0, 2),
        (0, 48),
        (48, 96),
        (96, 250),
        (250, 512),
        (512, 528),
        (528, 1024),
        (1024, 1040),
        (1040, 1100),
        (1100, length),
    )
    chunks = [(lo, min(hi, length)) for lo, hi in cuts if lo < length]
    return all(torch.equal(rows(lo, hi), whole[lo:hi]) for lo, hi in chunks)


def torch_attention_unexact(
    model: DecoderModel, max_len: int
) -> tuple[str | None, PaddedExtents | None]:
    """Where every GEMM gives a row the same bits in any batch (no padding, no row blocks)
    but attention runs on torch's GEMMs, why those would make a row's bits depend on its
    chunking (prompt: keys end where the chunk ends) or on its batch (decode: rows attend
    over the batch's longest extent, masked), else None; with the decode check's result
    where it ran (a runner that computes rows apart keeps it). ragtune's attention kernels
    are exact in both by construction; torch's bf16 GEMMs were, MKL's float32 ones sum the
    keys by the extent (the AVX2 kind, whose GEMMs are row-independent in MKL's strict
    mode)."""
    if not model.prompt_kernel and not prompt_attention_exact(model, max_len, key_multiple=1):
        return "prompt attention on torch's GEMMs depends on the chunking here", None
    if model.attention_kernel:
        return None, None
    padded = padded_extents_exact(model, max_len)
    if not (padded.softmax and padded.values):
        reason = "decode attention on torch's GEMMs depends on the batch's longest extent here"
        return reason, padded
    return None, padded


def wide_weights(model: DecoderModel) -> list[list[WideWeight]]:
    """The prompt GEMMs' weights, layer by layer."""
    return [
        [
            wide
            for linear in (w.qkv, w.o, w.gate_up, w.down)
            if (wide := getattr(linear, "wide", None))
        ]
        for w in model.layers
    ]


def settle_wide_gemms(
    model: DecoderModel, max_len: int, allow_blocks: bool = True, team_may_shrink: bool = False
) -> tuple[bool, bool, PaddedExtents]:
    """(rows independent, prompt GEMMs in row blocks, what decode attention may share).

    Where plain calls pass gemm_rows_independent: (True, False, nothing shared: not needed).
    Else this device sums by the row count and key extent (oneDNN's AMX kernels, MKL): the
    decode attention check (padded_extents_exact) runs, and where prompt attention is exact
    over padded keys too (prompt_attention_exact), the prompt GEMMs try fixed row blocks
    (prompt_gemm.py; not with `allow_blocks` false: engine.prompt_row_blocks). The check
    reads the first layer, so that layer goes first; the rest follow only if it passes, each
    weight's plain dense copy freed as its packed one is made (peak: one layer's copies).
    Where the engine's team may shrink (`model.threads: auto`), each weight shape's block is
    the largest whose bits hold at every team size (prompt_gemm.team_exact_block)."""
    if gemm_rows_independent(model):
        return True, False, PaddedExtents()
    padded = padded_extents_exact(model, max_len)
    layers = wide_weights(model)
    reason = blocks_unavailable(model, padded, layers) if allow_blocks else "turned off"
    if reason is None:  # prompt attention as it runs under blocks: fixed query blocks
        model.prompt_query_block = PROMPT_QUERY_BLOCK
        if not prompt_attention_exact(model, max_len):
            reason = "prompt attention depends on the chunking over padded keys"
    blocks: dict[tuple[int, ...], int] = {}  # weight shape -> its row block

    def use_blocks(weight: WideWeight) -> None:
        if not team_may_shrink:
            weight.use_row_blocks(True)
            return
        dense = weight.dense()
        shape = tuple(dense.shape)
        if shape not in blocks:
            blocks[shape] = team_exact_block(dense, torch.get_num_threads())
        weight.use_row_blocks(True, blocks[shape])

    if reason is None:
        try:
            for weight in layers[0]:
                use_blocks(weight)
        except RuntimeError as error:  # oneDNN could not pack this dtype here
            reason = f"oneDNN could not prepack the weights: {error}"
    if reason is None and not gemm_rows_independent(model):
        reason = "the check fails with them too"
    if reason is not None:
        model.prompt_query_block = None
        for weight in layers[0]:
            weight.use_row_blocks(False)
        logger.info("prompt GEMMs not in row blocks: %s", reason)
        return False, False, padded
    for layer in layers:
        for weight in layer:
            if weight.packed is None:
                use_blocks(weight)
            weight.drop_plain()
    return True, True, padded


def blocks_unavailable(
    model: DecoderModel, padded: PaddedExtents, layers: list[list[WideWeight]]
) -> str | None:
    """Why prompt GEMMs cannot try row blocks here, or None."""
    if not str(model.device).startswith("cpu"):
        return "not a CPU"
    if not row_blocks_supported(model.dtype):
        return f"no oneDNN prepacked linear for {model.dtype} here"
    if not padded.values:
        return "decode attention is not exact over padded keys here"
    if not all(layers):
        return "a layer has no dense prompt GEMM"
    return None


@dataclass(frozen=True)
class PaddedExtents:
    """Which parts of decode attention give a row the same bits over a longer key extent (the
    keys past its own extent class weighing exactly zero) as over its own class: then rows of
    every class share one call instead of one call per class (see attention.decode_attention)."""

    softmax: bool = False
    values: bool = False
    up_to: int = 0  # the longest extent checked: longer batches keep one call per class

    def shared(self, longest: int) -> PaddedExtents:
        """What may be shared in a step whose longest extent class is `longest`."""
        return self if longest <= self.up_to else PaddedExtents()


def padded_extents_exact(model: DecoderModel, max_len: int, rows: int = 8) -> PaddedExtents:
    """Checked on this device with the model's head shapes and dtype, at every extent class up
    to `max_len` (at most CHECKED_EXTENT keys): a row's float32 softmax over its own class
    against the same row inside a softmax over a longer class, and its value GEMM
    (probabilities in the compute dtype, values read in place from a cache-shaped buffer, as
    decode reads them) against the same row in one GEMM over the longer class.

    Measured on AMX (bf16) and emulated AVX2: class extents are multiples of 32 keys, and
    there the softmax sums the same lanes in the same order with zeros after them; the bf16
    value GEMM too, MKL's fp32 one not (its blocking over keys follows the extent)."""
    generator = torch.Generator().manual_seed(1)
    classes = extent_classes(min(max_len, CHECKED_EXTENT))
    group = model.num_heads // model.num_kv_heads
    kv, d, dtype, device = model.num_kv_heads, model.head_dim, model.dtype, model.device
    drawn_scores = (torch.randn(rows, kv, group, classes[-1], generator=generator) * 4).to(dtype)
    drawn_cache = torch.randn(rows, kv, classes[-1], d, generator=generator).to(dtype)
    softmax_same = values_same = True
    for longest in classes[1:]:
        shorter = [c for c in classes if c < longest]
        own = torch.randint(0, longest, (rows,), generator=generator)  # each row's position
        edges = [c - 1 for c in shorter[-rows:]]  # the last key of the classes below
        own[: len(edges)] = torch.tensor(edges)
        hidden = (torch.arange(longest)[None] > own[:, None])[:, None, None]
        scores = drawn_scores[..., :longest].masked_fill(hidden, float("-inf")).to(device)
        cache = drawn_cache[:, :, :longest].contiguous().to(device)
        probs = torch.softmax(scores.view(rows * kv, group, longest), dim=-1, dtype=torch.float32)
        probs = probs.to(dtype)
        out = torch.bmm(probs, cache.view(rows * kv, longest, d)).view(rows, kv, group, d)
        probs = probs.view(rows, kv, group, longest)
        for row in range(rows):
            length = next(c for c in classes if c > own[row])
            if length == longest:
                continue
            alone = torch.softmax(scores[row, ..., :length], dim=-1, dtype=torch.float32)
            alone = alone.to(dtype)
            softmax_same = softmax_same and torch.equal(alone, probs[row, ..., :length])
            if not softmax_same:
                return PaddedExtents()
            if values_same:
                values = cache[row : row + 1, :, :length].reshape(kv, length, d)
                values_same = torch.equal(torch.bmm(alone, values), out[row])
    return PaddedExtents(softmax_same, values_same, classes[-1])


def describe_sharing(padded: PaddedExtents) -> str:
    """For the start-up log and the engine info metric."""
    if padded.values:
        return f"scores+softmax+values<={padded.up_to}"
    if padded.softmax:
        return f"scores+softmax<={padded.up_to}"
    return "scores"


__all__ = [
    "CHECKED_EXTENT",
    "PROMPT_KEY_MULTIPLE",
    "WIDE_ROWS",
    "PaddedExtents",
    "describe_sharing",
    "gemm_rows_independent",
    "lora_factor_shapes",
    "padded_extents_exact",
    "prompt_attention_exact",
    "settle_wide_gemms",
    "torch_attention_unexact",
    "wide_weights",
]
