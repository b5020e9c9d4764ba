"""ragtune's C++ kernels (csrc/): one shared library, built once per machine with the system
C++ compiler and loaded with ctypes. No torch headers: a plain library builds in a few seconds
and shares torch's OpenMP runtime (same soname, already loaded), so its threads are torch's.
The kernels: the a8 GEMM (engine/a8.py), the decode LoRA rows (engine/lora_rowwise.py),
decode and prompt attention (engine/attention_rows.py), RMSNorm (engine/rms_norm.py), the int8 head
(engine/channel_int8.py), the sampler's greedy pass (engine/sampler.py), a decode step's
layers in one call (engine/decode_layers.py) and the ids of an OpenMP team's threads
(engine/team_size.py)."""

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

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = [
    CSRC / "a8_linear.cpp",
    CSRC / "lora_rows.cpp",
    CSRC / "attention_rows.cpp",
    CSRC / "attention_prompt.cpp",
    CSRC / "rms_norm.cpp",
    CSRC / "channel_int8.cpp",
    CSRC / "argmax_rows.cpp",
    CSRC / "decode_layers.cpp",
    CSRC / "team.cpp",
]
HEADERS = [
    CSRC / "vec8.h",
    CSRC / "vec16.h",
    CSRC / "attention_math.h",
    CSRC / "lora_rows.h",
    CSRC / "norm_row.h",
    CSRC / "kernels.h",
]
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp"]
ISA_NAMES = {1: "avx2", 2: "avx512-vnni", 3: "amx-int8"}


class KernelUnavailable(RuntimeError):
    """The kernels cannot run here (no C++ compiler, or a CPU without AVX2)."""


def cache_dir() -> Path:
    """Built kernels live per machine, outside any RAGTUNE_HOME (tests use many homes)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ragtune" / "kernels"


def _compiler() -> str:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise KernelUnavailable("no C++ compiler (g++ or $CXX) to build ragtune's kernels")
    return compiler


def _build(compiler: str) -> Path:
    """The shared library for this source, compiler and flags: built once, atomically (a
    temporary file renamed into place), so concurrent servers never load half a file."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    text = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(text + version.encode() + " ".join(FLAGS).encode())
    target = cache_dir() / f"ragtune_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", partial], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise KernelUnavailable(f"building ragtune's kernels failed: {done.stderr[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    logger.info("built ragtune's kernels: %s", target)
    return target


@functools.cache
def library() -> ctypes.CDLL:
    """The loaded library (raises KernelUnavailable with the reason)."""
    lib = ctypes.CDLL(str(_build(_compiler())))
    lib.a8_isa.restype = ctypes.c_int
    lib.a8_linear.restype = None
    lib.a8_linear.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_int, ctypes.c_int, ctypes.c_int,
        # optional LoRA rows: row_slot, a, a_scales, bt, b_scales, widths
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p,
        # optional RMSNorm before (weight, eps), RMSNorm after (weight, eps), residual after
        ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p,
    ]  # fmt: skip
    lib.lora_rows.restype = None
    lib.lora_rows.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
    ]  # fmt: skip
    lib.attention_rows.restype = None
    lib.attention_rows.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
        ctypes.c_int,
        # optional rotary embedding of q and the new k: cos, signed sin, row stride, rotary_dim
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
    ]  # fmt: skip
    lib.attention_pairs_supported.restype = ctypes.c_int
    lib.attention_prompt.restype = None
    lib.attention_prompt.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
    ]  # fmt: skip
    lib.channel_int8_linear.restype = None
    lib.channel_int8_linear.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
    ]  # fmt: skip
    lib.argmax_rows.restype = None
    lib.argmax_rows.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int,
    ]  # fmt: skip
    lib.rms_norm_rows.restype = None
    lib.rms_norm_rows.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p,
        ctypes.c_int,
    ]  # fmt: skip
    lib.decode_layers_supported.restype = ctypes.c_int
    lib.decode_layers.restype = None
    lib.decode_layers.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_void_p,
    ]  # fmt: skip
    lib.decode_glu.restype = None
    lib.decode_glu.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int,
    ]  # fmt: skip
    lib.team_thread_ids.restype = ctypes.c_int
    lib.team_thread_ids.argtypes = [ctypes.c_int, ctypes.c_void_p]
    if lib.a8_isa() == 0:
        raise KernelUnavailable("ragtune's kernels need AVX2 and FMA, which this CPU lacks")
    return lib


def bf16_flag(x: torch.Tensor, kernel: str) -> int:
    """The kernels' dtype argument for rows x: 1 bf16, 0 float32; any other dtype refused."""
    if x.dtype is torch.bfloat16:
        return 1
    if x.dtype is torch.float32:
        return 0
    raise TypeError(f"the {kernel} takes bf16 or fp32 rows, not {x.dtype}")


@functools.cache
def unavailable_reason() -> str | None:
    """Why the kernels cannot run on this machine, or None where it can (asked once: a failed
    build is not retried for every weight)."""
    try:
        library()
    except (KernelUnavailable, OSError) as error:
        return str(error)
    return None


@functools.cache
def chosen_isa() -> int:
    """AMX-INT8 (3: AVX-512 VNNI, with AMX tiles for steps of more than 8 rows) or AVX-512
    VNNI (2) where the CPU has it and ragtune's detection allows it (capped like torch's
    kernels by ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA: how tests emulate the AVX2 kind),
    else AVX2 (1). All give the same bits; only the speed differs."""
    from ragtune.hardware import detect

    features, best = detect().features, library().a8_isa()
    if best == 3 and "amx_int8" in features:
        return 3
    return 2 if best >= 2 and "avx512_vnni" in features else 1


@functools.cache
def attention_pairs() -> bool:
    """Whether decode attention takes its bf16-pair path (AVX-512 BF16, allowed by ragtune's
    detection as torch's kernels are: the emulated AVX2 kind takes the float path)."""
    from ragtune.hardware import detect

    return bool(library().attention_pairs_supported()) and "avx512_bf16" in detect().features


def isa() -> str:
    """The instruction set the kernel uses here (for logs and the engine info metric)."""
    return ISA_NAMES[chosen_isa()]
