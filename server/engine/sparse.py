"""Sparse adapters (SHiRA: a few entries of each weight matrix trained, every other one zero)
in the same batched step as LoRA and base rows.

A sparse adapter's delta cannot be folded into the shared base weights (other rows must not
see it), and a dense copy of every adapted matrix would cost the base model's size per
adapter. Each fused projection group of each layer keeps its adapter entries as one CSR matrix
[group out, in] (float32, the modules' entries side by side as the group's output columns),
and the rows of a batch that use the adapter get delta = x @ deltaWᵀ from a sparse-dense
product. The product runs on blocks of `BLOCK_ROWS` rows, zero-padded: MKL's sparse kernel
sums a row in an order that depends on the block's row count but not on the other rows in it
(checked in tests/engine/test_sparse.py), so a row's result is the same alone, next to any
neighbours, and whatever prompt chunk it is in.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

BLOCK_ROWS = 16  # rows per sparse product (fixed: the bits of a row depend on it)


@dataclass
class SparseAdapterWeights:
    """One sparse adapter: per adapted module its non-zero entries (module coordinates)."""

    key: str  # "name@version"
    rank: int  # PEFT's r: r * (in + out) entries per matrix, LoRA's parameter count
    # (layer, module) -> (rows [nnz] int64, cols [nnz] int64, values [nnz] float32)
    entries: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes + c.nbytes + v.nbytes for r, c, v in self.entries.values())

    @property
    def target_modules(self) -> set[str]:
        return {module for _, module in self.entries}

    @property
    def nnz(self) -> int:
        return sum(v.numel() for _, _, v in self.entries.values())


def group_matrices(
    adapter: SparseAdapterWeights,
    groups: dict[str, tuple[str, ...]],
    module_shapes: dict[str, tuple[int, int]],
    out_offsets: dict[str, list[tuple[int, int]]],
    device: str,
) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, group) -> the CSR delta of the fused group, built once when the adapter takes
    a slot."""
    by_group: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for (layer, module), (rows, cols, values) in adapter.entries.items():
        group = next(g for g, modules in groups.items() if module in modules)
        start, _ = out_offsets[group][groups[group].index(module)]
        by_group.setdefault((layer, group), []).append((rows + start, cols, values))
    matrices = {}
    for (layer, group), parts in by_group.items():
        rows = torch.cat([p[0] for p in parts])
        cols = torch.cat([p[1] for p in parts])
        values = torch.cat([p[2] for p in parts]).float()
        shape = (out_offsets[group][-1][1], module_shapes[groups[group][0]][0])
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            coo = torch.sparse_coo_tensor(torch.stack((rows, cols)), values, shape)
            matrices[(layer, group)] = coo.coalesce().to_sparse_csr().to(device)
    return matrices


# per sparse adapter used in a step: (batch rows using it, None for all; its CSR delta)
SparseTerms = list[tuple[torch.Tensor | None, torch.Tensor]]


def add_sparse(terms: SparseTerms, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out + each row's sparse delta; rows of other adapters (and base rows) are untouched."""
    for rows, matrix in terms:
        chosen = x if rows is None else x.index_select(0, rows)
        delta = _sparse_product(matrix, chosen).to(out.dtype)
        out = out + delta if rows is None else out.index_add(0, rows, delta)
    return out


def _sparse_product(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x @ matrixᵀ in float32, in zero-padded blocks of BLOCK_ROWS rows: [rows, out]."""
    count = x.shape[0]
    padded = -(-count // BLOCK_ROWS) * BLOCK_ROWS
    block_input = x.new_zeros(padded, x.shape[1], dtype=torch.float32)
    block_input[:count] = x
    blocks = [
        torch.sparse.mm(matrix, block_input[start : start + BLOCK_ROWS].t().contiguous()).t()
        for start in range(0, padded, BLOCK_ROWS)
    ]
    return torch.cat(blocks)[:count]
