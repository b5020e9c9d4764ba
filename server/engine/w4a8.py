"""int4 weights x int8 activations for decode rows (`engine.weights: w4a8`): the C++ kernel in
csrc/w4a8.cpp, built once per machine with the system C++ compiler and loaded with ctypes.

Why a kernel of our own: torch's int4 CPU kernel makes one pass over the weights per row
(16 rows cost 16 times one), oneDNN's int8 GEMM reads them once per batch but at 8 bits and
with a fixed cost per call that loses at one row. This one reads 4-bit weights once per call
for every row, with exact integer dot products (AVX-512 VNNI, else AVX2), so a row's result
depends on that row alone. llama.cpp multiplies its 4-bit formats the same way (activations
in int8 blocks of 32). No torch headers: a plain shared library builds in about 2 s and
shares torch's OpenMP runtime (same soname, already loaded), so its threads are torch's."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from server.engine.quantize import int4_dequantized, int4_grid

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "w4a8.cpp"
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp"]
ISA_NAMES = {1: "avx2", 2: "avx512-vnni"}


class KernelUnavailable(RuntimeError):
    """The w4a8 kernel cannot run here (no C++ compiler, or a CPU without AVX2)."""


def cache_dir() -> Path:
    """Built kernels live per machine, outside any RAGTUNE_HOME (tests use many homes)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ragtune" / "kernels"


def _compiler() -> str:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise KernelUnavailable("no C++ compiler (g++ or $CXX) to build the w4a8 kernel")
    return compiler


def _build(compiler: str) -> Path:
    """The shared library for this source, compiler and flags: built once, atomically (a
    temporary file renamed into place), so concurrent servers never load half a file."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + " ".join(FLAGS).encode())
    target = cache_dir() / f"w4a8-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", partial], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise KernelUnavailable(f"building the w4a8 kernel failed: {done.stderr[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    logger.info("built the w4a8 kernel: %s", target)
    return target


@functools.cache
def library() -> ctypes.CDLL:
    """The loaded kernel library (raises KernelUnavailable with the reason)."""
    lib = ctypes.CDLL(str(_build(_compiler())))
    lib.w4a8_isa.restype = ctypes.c_int
    lib.w4a8_linear.restype = None
    lib.w4a8_linear.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
        ctypes.c_int,
    ]  # fmt: skip
    if lib.w4a8_isa() == 0:
        raise KernelUnavailable("the w4a8 kernel needs AVX2 and FMA, which this CPU lacks")
    return lib


def unavailable_reason() -> str | None:
    """Why the kernel cannot run on this machine, or None where it can."""
    try:
        library()
    except (KernelUnavailable, OSError) as error:
        return str(error)
    return None


@functools.cache
def chosen_isa() -> int:
    """AVX-512 VNNI (2) where the CPU has it and ragtune's detection allows it (capped like
    torch's kernels by ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA: how tests emulate the AVX2
    kind), else AVX2 (1). Both give the same bits; only the speed differs."""
    from ragtune.hardware import detect

    vnni = library().w4a8_isa() == 2 and "avx512_vnni" in detect().features
    return 2 if vnni else 1


def isa() -> str:
    """The instruction set the kernel uses here (for logs and the engine info metric)."""
    return ISA_NAMES[chosen_isa()]


def pack(codes: torch.Tensor, scales_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4_grid's codes [out, in] and scales/zeros [groups, out, 2] in the kernel's layout
    (csrc/w4a8.cpp): nibbles [out/16, groups, 4, 16, 4] and float32 params [out/16, groups, 2,
    16] holding each group's scale and offset (w = code * scale + offset)."""
    out_features, in_features = codes.shape
    blocks, groups = out_features // 16, in_features // W4A8Linear.GROUP
    # channel = 16 * block + lane; input = 32 * group + 8 * vector + 4 * nibble + byte
    split = codes.to(torch.uint8).view(blocks, 16, groups, 4, 2, 4)
    split = split.permute(0, 2, 3, 1, 5, 4)  # block, group, vector, lane, byte, nibble
    nibbles = (split[..., 0] | (split[..., 1] << 4)).contiguous()
    scale, zero = scales_zeros.float().unbind(-1)  # [groups, out] each
    offset = zero - 8 * scale
    params = torch.stack([scale, offset], 1).view(groups, 2, blocks, 16).permute(2, 0, 1, 3)
    return nibbles, params.contiguous()


class W4A8Linear:
    """The int4 grid of Int4Linear (groups of 32, a scale and an offset each) in the w4a8
    kernel's layout, activations quantized to int8 per block of 32 inside the kernel. Prompt
    chunks of many rows use the same grid dequantized (the dense GEMM, as Int4Linear's)."""

    GROUP = 32

    def __init__(self, weight: torch.Tensor, isa: int | None = None):
        self.lib = library()
        self.isa = isa or chosen_isa()  # 1: AVX2, 2: AVX-512 VNNI (tests force either)
        codes, scales_zeros = int4_grid(weight, self.GROUP, torch.float32)
        self.out_features, self.in_features = weight.shape
        self.nibbles, self.params = pack(codes, scales_zeros)
        self.dense = int4_dequantized(codes, scales_zeros).to(weight.dtype)

    @classmethod
    def fits(cls, weight: torch.Tensor) -> bool:
        return weight.shape[1] % cls.GROUP == 0 and weight.shape[0] % 16 == 0

    def __call__(self, x: torch.Tensor, wide: bool = False) -> torch.Tensor:
        if wide:
            return F.linear(x, self.dense)
        if x.dtype not in (torch.bfloat16, torch.float32):
            raise TypeError(f"the w4a8 kernel takes bf16 or fp32 rows, not {x.dtype}")
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.empty(rows.shape[0], self.out_features, dtype=x.dtype)
        bf16 = int(x.dtype == torch.bfloat16)
        self.lib.w4a8_linear(
            rows.data_ptr(), bf16, rows.shape[0], self.in_features, self.nibbles.data_ptr(),
            self.params.data_ptr(), self.out_features, out.data_ptr(), bf16,
            torch.get_num_threads(), self.isa,
        )  # fmt: skip
        return out.view(*x.shape[:-1], self.out_features)
