"""The GPU's packed linear kind: weight-only int4 kept packed on CUDA (torch's tinygemm
kernel, the one gpt-fast and torchao serve int4 with), so a quantized model also takes a
quarter of bf16's GPU memory rather than being dequantized at load.

The grid is the CPU int4's (engine/quantize.py), in groups of 64 input channels: with the
vocabulary projection in int4 too, a 1.1B Llama's compact weights are about a third of bf16's
(the bf16 embedding table stays), where groups of 32 would need the head in bf16 and land at
0.35x. Every shape here is fixed per call and nothing synchronises with the host, so the
kernel runs inside captured CUDA graphs (engine/cuda_graphs.py)."""

from __future__ import annotations

import torch

from server.engine.quantize import int4_grid


class Int4GpuLinear:
    """y = x Wᵀ with W as int4 codes packed for torch's CUDA int4 kernel; bf16 activations."""

    GROUP = 64
    INNER_K_TILES = 8  # the packing's inner tiles: input features a multiple of 8 * 16

    def __init__(self, weight: torch.Tensor):
        codes, self.scales_zeros = int4_grid(weight, self.GROUP, torch.bfloat16)
        # two codes a byte, the even input channel in the high nibble (the kernel's order)
        paired = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()
        self.packed = torch._convert_weight_to_int4pack(paired, self.INNER_K_TILES)
        self.out_features = weight.shape[0]

    @classmethod
    def fits(cls, weight: torch.Tensor) -> bool:
        out_features, in_features = weight.shape
        return (
            out_features % 8 == 0
            and in_features % (cls.INNER_K_TILES * 16) == 0
            and in_features % cls.GROUP == 0
        )

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes

    def __call__(self, x: torch.Tensor, wide: bool = False) -> torch.Tensor:
        rows = x.to(torch.bfloat16).contiguous()
        return torch._weight_int4pack_mm(rows, self.packed, self.GROUP, self.scales_zeros).to(
            x.dtype
        )
