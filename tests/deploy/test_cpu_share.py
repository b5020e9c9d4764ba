"""model.threads: auto follows the cgroup quota (v1 and v2, any ancestor), the affinity mask and
a Ray replica's num_cpus; fake cgroup trees stand in for the kernel's."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragtune import cpu_share as cs
from ragtune.config import ModelConfig


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cs.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(cs.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)


def test_v2_quota_on_the_process_cgroup(tmp_path: Path, two_cores: None) -> None:
    proc = tmp_path / "proc_cgroup"
    _write(proc, "0::/kubepods/pod1/ctr\n")
    _write(tmp_path / "cg/kubepods/pod1/ctr/cpu.max", "150000 100000\n")
    share = cs.cpu_share(tmp_path / "cg", proc, ray_cpus=None)
    assert share.source == "quota" and share.cpus == pytest.approx(1.5)
    assert share.threads == 1  # rounded down: never more threads than the quota


def test_v2_tightest_ancestor_wins_and_max_is_no_limit(tmp_path: Path, two_cores: None) -> None:
    proc = tmp_path / "proc_cgroup"
    _write(proc, "0::/a/b\n")
    _write(tmp_path / "cg/a/b/cpu.max", "max 100000\n")
    _write(tmp_path / "cg/a/cpu.max", "300000 100000\n")
    assert cs.cgroup_cpu_limit(tmp_path / "cg", proc) == pytest.approx(3.0)
    _write(tmp_path / "cg/a/cpu.max", "max 100000\n")
    assert cs.cgroup_cpu_limit(tmp_path / "cg", proc) is None


def test_v1_cfs_quota(tmp_path: Path, two_cores: None) -> None:
    proc = tmp_path / "proc_cgroup"
    _write(proc, "4:memory:/docker/x\n2:cpu,cpuacct:/docker/x\n")
    _write(tmp_path / "cg/cpu,cpuacct/docker/x/cpu.cfs_quota_us", "200000\n")
    _write(tmp_path / "cg/cpu,cpuacct/docker/x/cpu.cfs_period_us", "100000\n")
    share = cs.cpu_share(tmp_path / "cg", proc, ray_cpus=None)
    assert (share.source, share.threads) == ("quota", 2)
    _write(tmp_path / "cg/cpu,cpuacct/docker/x/cpu.cfs_quota_us", "-1\n")
    assert cs.cgroup_cpu_limit(tmp_path / "cg", proc) is None


def test_affinity_and_ray_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cs.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(cs.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    missing = tmp_path / "none"
    share = cs.cpu_share(missing, missing, ray_cpus=None)
    assert (share.source, share.threads) == ("affinity", 3)
    share = cs.cpu_share(missing, missing, ray_cpus=1.0)
    assert (share.source, share.threads) == ("ray", 1)
    assert share.limits == {"cores": 8.0, "affinity": 3.0, "ray": 1.0}


def test_no_limits_means_every_core(tmp_path: Path, two_cores: None) -> None:
    missing = tmp_path / "none"
    share = cs.cpu_share(missing, missing, ray_cpus=None)
    assert share.threads == 8 and share.source == "affinity"  # the mask names all 8


def test_resolve_threads_and_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cs, "cpu_share", lambda: cs.CpuShare(2.0, "quota", {"quota": 2.0}))
    assert cs.resolve_threads("auto") == 2
    assert cs.resolve_threads(3) == 3
    assert cs.resolve_threads(None) is None
    assert ModelConfig().threads == "auto"
    assert ModelConfig(threads="4").threads == 4  # the environment gives strings
    assert ModelConfig(threads=None).threads is None
    with pytest.raises(ValueError):
        ModelConfig(threads=0)
    with pytest.raises(ValueError):
        ModelConfig(threads="many")


def test_ray_cpus_outside_ray_is_none() -> None:
    assert cs.ray_assigned_cpus() is None
