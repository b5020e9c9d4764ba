"""How many CPUs this process may really use, so torch starts no more threads than that.

torch sizes its OpenMP team from the cores it sees, not from what the process is given. A
container with a CPU quota (`docker --cpus 1`), a `taskset` mask or a Ray replica with
`num_cpus: 1` still sees every core; the team then spins at barriers waiting for threads the
scheduler has parked, and a decode step made of hundreds of small parallel regions slows 10x
or more. The share is the smallest of: the cgroup CPU quota (v2 `cpu.max`, v1
`cpu.cfs_quota_us` / `cpu.cfs_period_us`, at every level up to the root), the CPU affinity
mask, and, inside a Ray actor, the CPUs Ray assigned it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class CpuShare:
    cpus: float  # what the process may use, possibly fractional (a quota of 1.5 CPUs)
    source: str  # which limit decided it: "quota", "affinity", "ray" or "cores"
    limits: dict[str, float]  # every limit found, for the log

    @property
    def threads(self) -> int:
        """Whole threads: a fractional share rounds down (1.5 CPUs -> 1 thread), so the
        team never exceeds the quota and gets throttled mid-step."""
        return max(1, math.floor(self.cpus + 1e-6))


def cpu_share(
    cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP, ray_cpus: float | None = None
) -> CpuShare:
    """The smallest CPU limit that applies to this process (see the module docstring)."""
    limits: dict[str, float] = {"cores": float(os.cpu_count() or 1)}
    affinity = affinity_cpus()
    if affinity is not None:
        limits["affinity"] = float(affinity)
    quota = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if quota is not None:
        limits["quota"] = quota
    ray = ray_cpus if ray_cpus is not None else ray_assigned_cpus()
    if ray is not None and ray > 0:
        limits["ray"] = ray
    # on a tie, name the most specific limit (the one an operator set)
    specific = ("ray", "quota", "affinity", "cores")
    source = min(limits, key=lambda name: (limits[name], specific.index(name)))
    return CpuShare(limits[source], source, limits)


def resolve_threads(setting: int | str | None) -> int | None:
    """`model.threads`: a number is used as is, `auto` follows the CPU share, None leaves
    torch's default (every core)."""
    if setting is None or isinstance(setting, int):
        return setting
    if setting != "auto":
        raise ValueError(f"model.threads must be a number, 'auto' or null, not {setting!r}")
    share = cpu_share()
    logger.info(
        "threads: %d (CPU share %.2f from %s; limits found: %s)",
        share.threads,
        share.cpus,
        share.source,
        ", ".join(f"{k}={v:g}" for k, v in sorted(share.limits.items())),
    )
    return share.threads


# MKL's strict conditional numerical reproducibility: its GEMMs' bits independent of the
# thread count, on the best code path for the CPU
MKL_STRICT_REPRODUCIBILITY = "AUTO,STRICT"


def gemms_exact_at_any_thread_count() -> None:
    """The engine's team sizer (server/engine/team_size.py) changes the thread count while it
    serves. MKL's fp32 GEMMs (the prompt path where the CPU has no bf16: AVX2) split their
    sums by it: at 1 and 2 threads, 16-112 rows times a 1536-deep weight came out in other
    bits, and a prompt's logits with them. MKL's strict reproducible mode keeps them the same
    (docs/performance.md gives its cost). MKL reads it once, at its first call in the
    process, so this runs before the model loads; server/engine/team_exactness.py checks the
    result. An operator's own MKL_CBWR is kept."""
    os.environ.setdefault("MKL_CBWR", MKL_STRICT_REPRODUCIBILITY)


def affinity_cpus() -> int | None:
    getter = getattr(os, "sched_getaffinity", None)
    if getter is None:  # macOS
        return None
    try:
        return len(getter(0))
    except OSError:
        return None


def cgroup_cpu_limit(
    cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP
) -> float | None:
    """The tightest CPU quota on this process's cgroup or any ancestor, in CPUs (None: none)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    found: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2 (unified)
            found += _v2_limits(cgroup_root, path)
        elif "cpu" in controllers.split(","):  # cgroup v1
            found += _v1_limits(cgroup_root, controllers, path)
    return min(found) if found else None


def _ancestors(base: Path, path: str) -> list[Path]:
    """base/path and each parent up to base itself (a limit anywhere above applies too)."""
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    return [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2_limits(root: Path, path: str) -> list[float]:
    limits = []
    for directory in _ancestors(root, path):
        try:
            quota, _, period = (directory / "cpu.max").read_text().strip().partition(" ")
        except OSError:
            continue
        if quota != "max" and period:
            limits.append(_ratio(quota, period))
    return [v for v in limits if v > 0]


def _v1_limits(root: Path, controllers: str, path: str) -> list[float]:
    limits = []
    for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
        for directory in _ancestors(mount, path):
            try:
                quota = (directory / "cpu.cfs_quota_us").read_text().strip()
                period = (directory / "cpu.cfs_period_us").read_text().strip()
            except OSError:
                continue
            if quota != "-1":
                limits.append(_ratio(quota, period))
        if limits:
            break
    return [v for v in limits if v > 0]


def _ratio(quota: str, period: str) -> float:
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return 0.0


def ray_assigned_cpus() -> float | None:
    """CPUs Ray assigned to the current actor (a Serve replica); None outside one. Never
    imports Ray: a process that has not imported it is not a Ray worker."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        context = ray.get_runtime_context()
        if context.get_actor_id() is None:
            return None  # the driver or a plain task: not a replica
        return context.get_assigned_resources().get("CPU")
    except Exception:  # an old or partial Ray: treat as no limit
        return None
