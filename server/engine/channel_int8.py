"""The vocabulary projection on ragtune's own int8 kernel (csrc/channel_int8.cpp): W8A8Linear's
arithmetic (int8 weights with one scale per channel, int8 activations with one scale per
row, float32 logits), the same bits, without oneDNN.

Why: the head is a step's largest GEMM (Gemma 3 270M: 262k x 640). oneDNN's int8 GEMM ran it
at 7.5 ms for 16 rows and 4.1 ms for one on this project's AVX-512 EPYC; one exact integer sum
per logit and the weights streamed ahead of the products do it in less (figures in
docs/performance.md). Only where the CPU has AVX-512 VNNI and no AMX: elsewhere oneDNN keeps
the head (AVX2 CPUs sum in int16 pairs, which this kernel does not do; AMX CPUs were not
measured)."""

from __future__ import annotations

import torch

from server.engine import native
from server.engine.quantize import per_channel_int8

LANES = 16  # output channels per packed block


def pack(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [out, in] in the kernel's layout, unsigned (code + 128, as `vpdpbusd` takes
    one side): [out/16, in/4, 16 lanes, 4], a block's codes in the order its products read
    them."""
    out_features, in_features = codes.shape
    unsigned = (codes.to(torch.int16) + 128).to(torch.uint8)
    quads = unsigned.view(out_features // LANES, LANES, in_features // 4, 4)
    return quads.permute(0, 2, 1, 3).contiguous()


class ChannelInt8Linear:
    """x @ Wᵀ for rows of bf16 or float32, as float32: W8A8Linear's result, bit for bit."""

    def __init__(self, weight: torch.Tensor):
        self.lib = native.library()
        codes, self.scales = per_channel_int8(weight)
        self.out_features, self.in_features = weight.shape
        self.codes = pack(codes)
        self.scales = self.scales.float().contiguous()

    @staticmethod
    def supported() -> bool:
        """AVX-512 VNNI without AMX, as ragtune's detection sees it (tests emulating the AVX2
        kind turn it off)."""
        return native.unavailable_reason() is None and native.chosen_isa() == 2

    @classmethod
    def fits(cls, weight: torch.Tensor) -> bool:
        return weight.shape[1] % 16 == 0 and weight.shape[0] % LANES == 0

    def __call__(self, x: torch.Tensor, wide: bool = False) -> torch.Tensor:
        bf16 = native.bf16_flag(x, "int8 head")
        rows = x.reshape(-1, self.in_features)
        if rows.stride(1) != 1:
            rows = rows.contiguous()
        out = torch.empty((rows.shape[0], self.out_features), dtype=torch.float32)
        self.lib.channel_int8_linear(
            rows.data_ptr(), bf16, rows.shape[0], rows.stride(0), self.in_features,
            self.codes.data_ptr(), self.scales.data_ptr(), self.out_features, out.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return out.view(*x.shape[:-1], self.out_features)
