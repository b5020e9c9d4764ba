"""The dense GEMM of prompt chunks (the `wide` path of every linear kind).

Why a module of its own: prompt chunks may share a forward and prefixes are reused from the
prefix cache only where a row's bits do not depend on the rows beside it
(models/exactness.py). oneDNN's bf16 GEMM takes another path for a lone row (a GEMV that sums
in another order: measured on an AVX-512 BF16 EPYC, SmolLM2's down projection), and a lone-row
chunk is common: a prompt whose prefix came from the cache ends in one. Computed as the first
of two rows it takes the many-row path, whose rows are independent of each other (checked at
start-up), so the whole machine keeps batched prefill and the prefix cache.

On a Xeon with AMX that is not enough: oneDNN's AMX kernels choose their blocking by the row
count (SmolLM2's shapes, 2 threads: 1-32 rows sum one way, 33-256 another, 512 a third), so a
row's bits depend on how many rows share its call. There a WideWeight runs its GEMM in blocks
of ROW_BLOCK rows on weights prepacked for that count, the last block padded with zero rows:
every row then goes through the same kernel whatever else is in its chunk.
DecoderModel turns the blocks on where the start-up check fails without them and passes with
them (models/exactness.py: settle_wide_gemms).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# Rows per blocked call: between short chunks (25 rows, SmolLM2's four projections, one
# layer: 0.8 ms against 0.4 unblocked; blocks of 256: 1.3) and long ones (512 rows: 3.4 ms
# against 2.1; blocks of 256: 2.8). docs/performance.md, stop 36.
ROW_BLOCK = 128


def wide_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weightᵀ for a prompt chunk's rows ([..., in]), a lone row computed as one of two."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] != 1:
        return F.linear(x, weight)
    pair = F.linear(rows.expand(2, -1).contiguous(), weight)
    return pair[:1].view(*x.shape[:-1], weight.shape[0])


def row_blocks_supported(dtype: torch.dtype) -> bool:
    """Whether this torch has oneDNN's prepacked linear (the blocked path's GEMM) for `dtype`
    on this CPU."""
    mkldnn = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")):
        return False
    if dtype == torch.bfloat16:
        try:
            return bool(mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # an older torch: no such op
            return False
    return dtype == torch.float32


class WideWeight:
    """A weight as prompt chunks multiply it: the dense GEMM on the dequantized grid (or the
    dense weight itself). `source` is the [out, in] weight in the compute dtype, or a function
    making it on each call (Int8Linear keeps no dense copy: it dequantizes on the fly)."""

    def __init__(self, source: torch.Tensor | Callable[[], torch.Tensor]):
        self.source: torch.Tensor | Callable[[], torch.Tensor] | None = source
        self.packed: torch.Tensor | None = None  # set by use_row_blocks
        self.block = ROW_BLOCK
        self.out_features = 0

    def dense(self) -> torch.Tensor:
        if self.source is None:
            raise RuntimeError("the plain dense weight was freed for the blocked prompt GEMM")
        return self.source() if callable(self.source) else self.source

    def use_row_blocks(self, on: bool, block: int = ROW_BLOCK) -> None:
        """Blocks of `block` rows on prepacked weights (on), or one call per chunk (off)."""
        if not on:
            self.packed = None
            return
        weight = self.dense()
        self.out_features = weight.shape[0]
        self.block = block
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, block)

    def drop_plain(self) -> None:
        """Free the plain dense copy once blocks are settled on (the packed one replaces it)."""
        if self.packed is not None:
            self.source = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return wide_linear(x, self.dense())
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        count, block = rows.shape[0], self.block
        if count % block:
            rows = torch.cat((rows, rows.new_zeros(block - count % block, rows.shape[1])))
        blocks = [
            torch.ops.mkldnn._linear_pointwise(
                rows[start : start + block], self.packed, None, "none", [], ""
            )
            for start in range(0, rows.shape[0], block)
        ]
        out = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        return out[:count].view(*x.shape[:-1], self.out_features)


def team_exact_block(weight: torch.Tensor, most: int) -> int:
    """The largest row block (ROW_BLOCK, then halves down to a quarter of it) whose prepacked
    GEMM on `weight` gives the same bits at every team size up to `most`, else ROW_BLOCK.

    Why: oneDNN's AMX kernels may split a block's sums among the threads, by shape (on the
    Xeon, 2 threads against 1: Gemma 3's down projection, 640 x 2048, differs in blocks of 128
    and 256 rows, not 64; SmolLM2's four projections in none up to 128), and the engine's
    team changes size while it serves (engine/team_size.py). A smaller block costs that GEMM
    speed (Gemma's down at 512 rows: 1.88 ms in blocks of 64 against 1.48); where none keeps
    the bits, the team's start-up probe keeps the team whole (engine/team_exactness.py)."""
    generator = torch.Generator().manual_seed(4)
    before = torch.get_num_threads()
    try:
        for block in (ROW_BLOCK, ROW_BLOCK // 2, ROW_BLOCK // 4):
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, block)
            x = torch.randn(block, weight.shape[1], generator=generator).to(weight.dtype)
            outputs = []
            for threads in range(most, 0, -1):
                torch.set_num_threads(threads)
                outputs.append(torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
            if all(torch.equal(out, outputs[0]) for out in outputs[1:]):
                return block
    finally:
        torch.set_num_threads(before)
    return ROW_BLOCK
