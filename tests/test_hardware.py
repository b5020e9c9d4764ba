"""CPU capability detection and the settings it picks: the flags a CPU reports, capped by
what torch and oneDNN were told to use (how a CPU of the other kind is emulated)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ragtune.hardware import (
    CpuCapabilities,
    compute_dtype_name,
    cpu_flags,
    slow_setting_warning,
    usable_features,
)

ZEN4_FLAGS = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "fma", "sse4_2"}
SAPPHIRE_RAPIDS_FLAGS = ZEN4_FLAGS | {"avx_vnni", "amx_bf16", "amx_int8", "amx_tile"}
ZEN3_FLAGS = {"avx2", "fma", "sse4_2"}


def caps(features: tuple[str, ...], aten: str = "AVX512", cuda: bool = False) -> CpuCapabilities:
    return CpuCapabilities(features=features, aten=aten, onednn_cap=None, cuda=cuda)


def test_features_follow_the_flags():
    assert usable_features(ZEN3_FLAGS, "AVX2", None) == ("avx2",)
    zen4 = usable_features(ZEN4_FLAGS, "AVX512", None)
    assert zen4 == ("avx2", "avx512f", "avx512_vnni", "avx512_bf16")
    assert "amx_bf16" in usable_features(SAPPHIRE_RAPIDS_FLAGS, "AVX512", None)


@pytest.mark.parametrize(
    ("aten", "onednn", "expected"),
    [
        ("AVX2", "AVX2", ("avx2",)),  # the emulated AVX2-only kind
        ("AVX2", None, ("avx2", "avx_vnni")),  # torch capped; oneDNN still has AVX-VNNI
        (
            "AVX512",
            "AVX512_CORE_BF16",
            ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16"),
        ),
        ("DEFAULT", None, ()),
    ],
)
def test_caps_from_torch_and_onednn_remove_features(aten, onednn, expected):
    assert usable_features(SAPPHIRE_RAPIDS_FLAGS, aten, onednn) == expected


def test_kinds_and_native_bf16():
    avx2 = caps(("avx2",), "AVX2")
    zen4 = caps(("avx2", "avx512f", "avx512_vnni", "avx512_bf16"))
    assert (avx2.kind, avx2.native_bf16, avx2.int8_dot) == ("avx2", False, False)
    assert (zen4.kind, zen4.native_bf16, zen4.int8_dot) == ("avx512-bf16", True, True)
    assert caps(("avx2", "avx512f", "amx_bf16")).kind == "avx512-bf16-amx"
    assert "avx2" in avx2.describe() and avx2.as_labels()["cpu_kind"] == "avx2"


def test_auto_dtype_is_bf16_only_with_native_bf16():
    avx2 = caps(("avx2",), "AVX2")
    zen4 = caps(("avx2", "avx512f", "avx512_bf16"))
    assert compute_dtype_name("auto", "cpu", avx2) == "fp32"
    assert compute_dtype_name("auto", "cpu", zen4) == "bf16"
    assert compute_dtype_name("auto", "cuda", avx2) == "bf16"
    assert compute_dtype_name("bf16", "cpu", avx2) == "bf16"  # explicit settings win...
    warning = slow_setting_warning("bf16", "cpu", avx2)  # ...with a warning where slow
    assert warning and "fp32" in warning
    assert slow_setting_warning("bf16", "cpu", zen4) is None
    assert slow_setting_warning("fp32", "cpu", avx2) is None


def test_cpu_flags_reads_proc_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_emulated_avx2_is_detected_in_a_fresh_process():
    """ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA act at process start: a new interpreter."""
    code = (
        "import json; from ragtune.hardware import detect, compute_dtype_name; c = detect(); "
        "print(json.dumps([c.kind, c.native_bf16, compute_dtype_name('auto', 'cpu')]))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    kind, native, dtype = json.loads(out.stdout.strip().splitlines()[-1])
    assert not native and dtype == "fp32"
    assert kind in ("avx2", "baseline")  # baseline only on a CPU without AVX2 at all
