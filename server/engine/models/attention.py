"""The attention arithmetic of the compact forward, for prompts and for decode steps.

Every call is Hugging Face's eager arithmetic (scores in the compute dtype, softmax in
float32) and exact under any subset of query rows and any masked key extent: masked keys
weigh exactly zero, so a row's result depends neither on its batch neighbours nor on how its
prompt was chunked. Where a kernel's summation order follows the key extent (AMX, MKL), each
decode row attends over an extent set by its own length (its class), and rows of several
classes share a call only as far as this device's start-up check allows (exactness.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.engine import attention_prompt
from server.engine.kv_cache import KVCache

if TYPE_CHECKING:
    from server.engine.models.base import DecoderModel

# Query rows of a prompt chunk whose attention runs at once (see prompt_attention).
PROMPT_QUERY_BLOCK = 128


def attention(
    grouped: torch.Tensor,  # [batch, group * queries, d] query heads sharing a kv head
    keys_t: torch.Tensor,  # [batch, d, length]
    values: torch.Tensor,  # [batch, length, d]
    bias: torch.Tensor,  # broadcast to [batch, group * queries, length]: 0 or -inf
    scale: float,
    softcap: float | None = None,  # DecoderModel.attn_softcap
) -> torch.Tensor:
    """Hugging Face's eager attention in three ops: the scale and the mask fused into the
    score GEMM on transposed keys, one GEMM for the values. For one query per row the CPU
    flash kernel is mostly overhead (1.47 ms against 0.19 ms at 16 rows x 256 keys); for
    prompts SDPA fell back to its unfused math path."""
    scores = scores_of(grouped, keys_t, bias, scale, softcap)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(grouped.dtype)
    return torch.bmm(probs, values)


def scores_of(
    queries: torch.Tensor,  # [batch, rows, d]
    keys_t: torch.Tensor,  # [batch, d, length]
    bias: torch.Tensor,  # broadcast to [batch, rows, length]: 0 or -inf
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """Masked attention scores: the scale and the mask fused into the GEMM; with a soft cap
    (Gemma 2), Hugging Face's order: scaled scores, tanh(s / cap) * cap, then the mask."""
    if softcap is None:
        return torch.baddbmm(bias, queries, keys_t, alpha=scale)
    scores = torch.bmm(queries, keys_t) * scale
    return torch.tanh(scores / softcap) * softcap + bias


def prompt_attention(
    model: DecoderModel,
    q: torch.Tensor,  # [rows, heads, d] one prompt chunk's queries
    keys_t: torch.Tensor,  # [kv_heads, d, end]
    values: torch.Tensor,  # [kv_heads, end, d]
    mask: torch.Tensor,  # [rows, end] 0 or -inf
) -> torch.Tensor:
    """A prompt chunk's attention [rows, q_size], PROMPT_QUERY_BLOCK query rows at a time: a
    long chunk's scores, float32 probabilities and mask (heads x rows x keys; 28 MB a layer
    for 512 rows over 1,530 keys) would go through memory several times, a block's stay in
    cache (a 1,530-token prompt: 1.34 -> 0.83 s; 128 rows as good as 192 or 256, better than
    32, 64 or unblocked). Exact: a query row's result does not depend on the other rows of
    its GEMM. Where `model.prompt_kernel`, one call on ragtune's kernel instead
    (engine/attention_prompt.py)."""
    if model.prompt_kernel:
        return attention_prompt.attend(model, q, keys_t, values, mask)
    kv, d = model.num_kv_heads, model.head_dim
    group = model.num_heads // kv
    parts = []
    for lo in range(0, q.shape[0], PROMPT_QUERY_BLOCK):
        hi = min(q.shape[0], lo + PROMPT_QUERY_BLOCK)
        block_q, block_mask = q[lo:hi], mask[lo:hi]
        if model.prompt_query_block and hi - lo < model.prompt_query_block:
            # a short block padded with zero queries (the last row's mask; dropped after):
            # on AMX the value GEMM over 1,000+ keys sums a row by the query count
            pad = model.prompt_query_block - (hi - lo)
            block_q = torch.cat((block_q, block_q.new_zeros(pad, *block_q.shape[1:])))
            block_mask = torch.cat((block_mask, block_mask[-1:].expand(pad, -1)))
        rows = block_q.shape[0]
        # the query heads that share a kv head, these rows: [kv_heads, group * rows, d]
        grouped = block_q.transpose(0, 1).reshape(kv, -1, d)
        bias = block_mask.repeat(group, 1)[None]
        attn = attention(grouped, keys_t, values, bias, model.scale, model.attn_softcap)
        attn = attn.view(kv, group, rows, d)[:, :, : hi - lo]
        parts.append(attn.permute(2, 0, 1, 3).reshape(hi - lo, model.q_size))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class DecodeExtents:
    """A decode step's attention plan for one sliding window (plan_decode): groups of rows
    with their key extent (and mask bias when a group is alone); with several groups, the
    bias of every row over the longest extent for the shared score GEMM, and whether the
    softmax is shared too."""

    groups: list[tuple[torch.Tensor | slice | None, int, torch.Tensor | None]]
    shared_bias: torch.Tensor | None = None
    shared_softmax: bool = False


def plan_decode(
    model: DecoderModel, positions: torch.Tensor, cache: KVCache, window: int | None
) -> DecodeExtents:
    """How a decode step's rows attend in layers with this sliding window: (rows, key extent,
    mask bias) per group of rows sharing one batched GEMM; rows None means all rows in slot
    order, a slice a run of neighbouring slots (read in place), a tensor scattered slots
    (their values copied out).

    Where GEMMs are row-independent, one group over the batch's longest length. Elsewhere
    (`fixed_decode_rows`: AMX, MKL) a kernel may sum the same keys in another order when the
    extent changes (seen on AMX: a lone row over 48 keys and the same row among longer ones
    over 64 differ in the last bit), so each row attends over an extent set by its own length
    (`KVCache.extent_class`). The score GEMM (q·Kᵀ sums over head_dim, not over keys) gives
    every key the same bits whatever the extent, so all rows share one score GEMM over the
    longest extent; where this device's check (`model.padded_extents`) found the softmax, and
    the value GEMM, exact over the longest class too, those are shared as well: one group,
    as where rows are independent. Else they run per class: rows of one class share a GEMM;
    the runner keeps slots in admission order, longest first, so a class is mostly a run of
    neighbouring slots, a view and not a copy (CompactRunner.release)."""
    group = model.num_heads // model.num_kv_heads
    if model.fixed_decode_rows:
        classes = [cache.extent_class(p + 1) for p in positions.tolist()]
    else:
        classes = [cache.bucket(int(positions.max()) + 1)] * positions.shape[0]
    ring = cache.ring_for(window)
    if ring is not None:  # a sliding-window layer's ring holds at most `ring` keys, in index order
        classes = [min(c, ring) for c in classes]
    lengths = sorted(set(classes))

    def bias_for(own: torch.Tensor, length: int) -> torch.Tensor:
        # [rows * kv_heads, heads per kv head, length]: 0 where a row may look, -inf not
        bias = model.mask(own, length, window, ring)[:, None, :]
        return bias.repeat_interleave(model.num_kv_heads, 0).expand(-1, group, -1).contiguous()

    shared = model.padded_extents.shared(lengths[-1])
    if len(lengths) == 1 or shared.values:
        return DecodeExtents([(None, lengths[-1], bias_for(positions, lengths[-1]))])
    groups = []
    for length in lengths:
        members = [i for i, c in enumerate(classes) if c == length]
        groups.append((_row_selection(members, len(classes)), length, None))
    return DecodeExtents(groups, bias_for(positions, lengths[-1]), shared.softmax)


def decode_attention(
    model: DecoderModel,
    layer: int,
    q: torch.Tensor,  # [rows, heads, d] one query token per row
    cache: KVCache,
    extents: DecodeExtents,
) -> torch.Tensor:
    """Attention of one decode step in one layer: [rows, q_size]."""
    kv, d = model.num_kv_heads, model.head_dim
    group = model.num_heads // kv
    batch = q.shape[0]
    if extents.shared_bias is None:
        [(_, length, bias)] = extents.groups
        keys_t, values = cache.batch_view(layer, batch, length)
        groups = batch * kv  # [groups, group, d]
        return attention(
            q.reshape(groups, group, d),
            keys_t.reshape(groups, d, length),
            values.reshape(groups, length, d),
            bias,
            model.scale,
            model.attn_softcap,
        ).reshape(batch, model.q_size)
    longest = extents.groups[-1][1]
    keys_t, _ = cache.batch_view(layer, batch, longest)
    scores = scores_of(
        q.reshape(batch * kv, group, d),
        keys_t.reshape(batch * kv, d, longest),
        extents.shared_bias,
        model.scale,
        model.attn_softcap,
    ).view(batch, kv, group, longest)
    if extents.shared_softmax:
        scores = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = q.new_empty(batch, model.q_size)
    for rows, length, _ in extents.groups:
        own = scores[rows, ..., :length]
        count = own.shape[0] * kv
        probs = own.reshape(count, group, length)
        if not extents.shared_softmax:
            probs = torch.softmax(probs, dim=-1, dtype=torch.float32).to(q.dtype)
        values = cache.values_view(layer, rows, length).reshape(count, length, d)
        out[rows] = torch.bmm(probs, values).reshape(-1, model.q_size)
    return out


def _row_selection(members: list[int], rows: int) -> torch.Tensor | slice | None:
    """None for every row, a slice for a run of neighbouring rows, else the row indices."""
    if len(members) == rows:
        return None
    if members[-1] - members[0] + 1 == len(members):
        return slice(members[0], members[-1] + 1)
    return torch.tensor(members)


__all__ = [
    "PROMPT_QUERY_BLOCK",
    "DecodeExtents",
    "attention",
    "decode_attention",
    "plan_decode",
    "prompt_attention",
]
