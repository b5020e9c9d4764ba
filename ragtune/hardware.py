"""What this machine's CPU (and GPU) can do fast, detected once at start-up.

Why: x86 servers of the same kind come with and without native bf16. Where the CPU lacks it
(AVX2-only AMD EPYC), torch's bf16 GEMMs run at ~0.3 GFLOP/s against ~170 in fp32, so the
compute dtype and the packed decode kernels must follow the instruction set, not a fixed
default. The instruction sets come from the CPU's flags, capped by what torch and oneDNN were
told to use (`ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`), which is also how a machine of the
other kind is emulated for tests.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

# The flags that decide kernels, in /proc/cpuinfo spelling, with the oneDNN ISA level
# (ONEDNN_MAX_CPU_ISA) that first allows each.
FEATURE_ISA_LEVEL = {
    "avx2": "AVX2",
    "avx_vnni": "AVX2_VNNI",
    "avx512f": "AVX512_CORE",
    "avx512_vnni": "AVX512_CORE_VNNI",
    "avx512_bf16": "AVX512_CORE_BF16",
    "amx_bf16": "AVX512_CORE_AMX",
    "amx_int8": "AVX512_CORE_AMX",
}
# oneDNN's ISA levels from lowest to highest (a cap allows its level and every lower one).
ONEDNN_ISA_ORDER = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX10_1_512",
    "AVX512_CORE_AMX",
    "AVX10_1_512_AMX_FP16",
)
# torch's own vectorized kernels (ATEN_CPU_CAPABILITY) needed by a feature to be used.
ATEN_NEEDS_AVX512 = {"avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}


@dataclass(frozen=True)
class CpuCapabilities:
    """The kernel-relevant instruction sets this process may use."""

    features: tuple[str, ...]  # of FEATURE_ISA_LEVEL's keys, usable by torch and oneDNN
    aten: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...
    onednn_cap: str | None  # ONEDNN_MAX_CPU_ISA when set
    cuda: bool

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware (AVX-512 BF16 or AMX): bf16 GEMMs beat fp32 here."""
        return "avx512_bf16" in self.features or "amx_bf16" in self.features

    @property
    def int8_dot(self) -> bool:
        """VNNI: int8 dot products summed in int32 (without it x86 int8 kernels add pairs of
        products in int16, which saturates)."""
        return "avx512_vnni" in self.features or "avx_vnni" in self.features

    @property
    def kind(self) -> str:
        """A short name of the CPU kind for logs, metrics and bench output."""
        if "amx_bf16" in self.features:
            return "avx512-bf16-amx"
        if self.native_bf16:
            return "avx512-bf16"
        if "avx512f" in self.features:
            return "avx512"
        if "avx2" in self.features:
            return "avx2"
        return "baseline"

    def describe(self) -> str:
        cap = f", oneDNN capped at {self.onednn_cap}" if self.onednn_cap else ""
        gpu = ", CUDA" if self.cuda else ""
        return f"CPU {self.kind} (torch {self.aten}{cap}; {' '.join(self.features)}){gpu}"

    def as_labels(self) -> dict[str, str]:
        return {
            "cpu_kind": self.kind,
            "cpu_features": ",".join(self.features),
            "torch_capability": self.aten,
            "cuda": str(self.cuda).lower(),
        }


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def usable_features(flags: set[str], aten: str, onednn_cap: str | None) -> tuple[str, ...]:
    """The kernel-relevant flags that both torch's capability and the oneDNN cap allow."""
    cap_level = _isa_level(onednn_cap) if onednn_cap else len(ONEDNN_ISA_ORDER)
    aten_avx512 = aten.upper().startswith("AVX512")
    aten_avx2 = aten_avx512 or aten.upper() == "AVX2"
    usable = []
    for feature, isa in FEATURE_ISA_LEVEL.items():
        if feature not in flags or _isa_level(isa) > cap_level:
            continue
        if feature in ATEN_NEEDS_AVX512 and not aten_avx512:
            continue
        if not aten_avx2:
            continue
        usable.append(feature)
    return tuple(usable)


def _isa_level(isa: str) -> int:
    name = isa.strip().upper()
    if name in ("ALL", "DEFAULT", ""):
        return len(ONEDNN_ISA_ORDER)
    return ONEDNN_ISA_ORDER.index(name) if name in ONEDNN_ISA_ORDER else len(ONEDNN_ISA_ORDER)


@functools.cache
def detect() -> CpuCapabilities:
    import torch

    aten = torch.backends.cpu.get_cpu_capability()
    onednn_cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return CpuCapabilities(
        features=usable_features(cpu_flags(), aten, onednn_cap),
        aten=aten,
        onednn_cap=onednn_cap,
        cuda=torch.cuda.is_available(),
    )


def compute_dtype_name(setting: str, device: str, caps: CpuCapabilities | None = None) -> str:
    """`model.dtype` resolved: 'auto' is bf16 on CUDA and on CPUs with native bf16, else fp32."""
    if setting != "auto":
        return setting
    if str(device).startswith("cuda"):
        return "bf16"
    return "bf16" if (caps or detect()).native_bf16 else "fp32"


def slow_setting_warning(
    dtype_name: str, device: str, caps: CpuCapabilities | None = None
) -> str | None:
    """A warning for an explicit setting known to be slow on this CPU, else None."""
    caps = caps or detect()
    if dtype_name == "bf16" and str(device).startswith("cpu") and not caps.native_bf16:
        return (
            f"model.dtype=bf16 on a CPU without native bf16 ({caps.kind}): bf16 GEMMs run "
            "~500x slower than fp32 here (long prompts take tens of seconds); "
            "model.dtype: auto picks fp32 on this CPU"
        )
    return None
