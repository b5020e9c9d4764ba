"""Preallocated KV cache with one slot per running sequence.

Running sequences always occupy slots 0..batch-1, so a decode step reads the cache as one
strided view with no gather; when a sequence leaves, the last one moves into its slot.
Keys are stored transposed ([head_dim, positions] per head): the decode score GEMM q·Kᵀ then
reads K in the layout the batched GEMM wants, 2.5x faster than a transposed view at 16 rows
x 192 positions, with bit-identical results.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str,
        bucket_size: int = 16,
    ):
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        transposed = (num_layers, num_slots, num_kv_heads, head_dim, max_len)
        self.keys_t = torch.zeros(transposed, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots = num_slots
        self.max_len = max_len
        self.bucket_size = bucket_size

    @property
    def nbytes(self) -> int:
        return self.keys_t.nbytes + self.values.nbytes

    def bucket(self, length: int) -> int:
        """Attention length rounded up, so shapes repeat across steps (masking hides the rest);
        small buckets, since every row of a decode step reads the batch's longest length."""
        rounded = -(-length // self.bucket_size) * self.bucket_size
        return min(rounded, self.max_len)

    def write_prompt(
        self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """k, v: [tokens, kv_heads, d] for positions start..start+tokens."""
        end = start + k.shape[0]
        self.keys_t[layer, slot, :, :, start:end] = k.permute(1, 2, 0)
        self.values[layer, slot, :, start:end] = v.transpose(0, 1)

    def prompt_view(self, layer: int, slot: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values [kv_heads, end, d] (keys a transposed view)."""
        return (
            self.keys_t[layer, slot, :, :, :end].transpose(-1, -2),
            self.values[layer, slot, :, :end],
        )

    def write_decode(
        self,
        layer: int,
        rows: torch.Tensor,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """k, v: [batch, kv_heads, d]; row i writes slot i at positions[i]."""
        self.keys_t[layer, rows, :, :, positions] = k
        self.values[layer, rows, :, positions] = v

    def batch_view(self, layer: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """keys_t [batch, kv_heads, d, length] and values [batch, kv_heads, length, d]."""
        return self.keys_t[layer, :batch, ..., :length], self.values[layer, :batch, :, :length]

    def clear(self, slot: int, length: int) -> None:
        """Zero a slot's first `length` positions and its last one (where rows still
        prefilling write). Masked attention still multiplies masked positions by zero, so a
        NaN or Inf left there would turn a later occupant's output into NaN."""
        self.keys_t[:, slot, ..., :length] = 0
        self.keys_t[:, slot, ..., -1] = 0
        self.values[:, slot, :, :length] = 0
        self.values[:, slot, :, -1] = 0

    def move(self, source: int, target: int, length: int) -> None:
        """Copy a sequence's first `length` positions from one slot to another (all layers)."""
        self.keys_t[:, target, ..., :length] = self.keys_t[:, source, ..., :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]
