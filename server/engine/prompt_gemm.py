"""The dense GEMM of prompt chunks (the `wide` path of every linear kind).

Why a module of its own: prompt chunks may share a forward and prefixes are reused from the
prefix cache only where a row's bits do not depend on the rows beside it
(models/exactness.py). oneDNN's bf16 GEMM takes another path for a lone row (a GEMV that sums
in another order: measured on an AVX-512 BF16 EPYC, SmolLM2's down projection), and a lone-row
chunk is common: a prompt whose prefix came from the cache ends in one. Computed as the first
of two rows it takes the many-row path, whose rows are independent of each other (checked at
start-up), so the whole machine keeps batched prefill and the prefix cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def wide_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weightᵀ for a prompt chunk's rows ([..., in]), a lone row computed as one of two."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] != 1:
        return F.linear(x, weight)
    pair = F.linear(rows.expand(2, -1).contiguous(), weight)
    return pair[:1].view(*x.shape[:-1], weight.shape[0])
