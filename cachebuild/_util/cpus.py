"""How many CPUs this process may really use.

``os.cpu_count()`` counts the machine's CPUs, and the affinity mask the ones
the process may be scheduled on; neither sees a container's CPU *quota*
(cgroup ``cpu.max``, or ``cpu.cfs_quota_us`` on cgroup v1).  A CI runner or
a Kubernetes pod commonly shows 32 or 64 CPUs and grants two.  Thread pools
sized from the CPU count then oversubscribe the quota many times over, and
ONNX Runtime's and OpenMP's spinning worker threads burn the quota waiting
for each other: a build runs tens of times slower than it would with two
threads.  Every pool in cachebuild is sized from :func:`usable_cpus`.

``CACHEBUILD_CPUS`` (a positive integer) overrides the detection.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

__all__ = ["usable_cpus", "cgroup_cpu_limit"]

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _quota(quota: float, period: float) -> float | None:
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def _v2_limit(root: Path, proc_cgroup: str) -> float | None:
    """The tightest ``cpu.max`` from this process's cgroup up to the root."""
    rel = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0":
            rel = parts[2].strip()
    if rel is None:
        return None
    best: float | None = None
    here = (root / rel.lstrip("/")).resolve() if rel != "/" else root
    for directory in (here, *here.parents):
        try:
            raw = (directory / "cpu.max").read_text().split()
        except OSError:
            raw = []
        if len(raw) == 2 and raw[0] != "max":
            try:
                limit = _quota(float(raw[0]), float(raw[1]))
            except ValueError:
                limit = None
            if limit is not None and (best is None or limit < best):
                best = limit
        if directory == root:
            break
    return best


def _v1_limit(root: Path) -> float | None:
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        base = root / name
        try:
            quota = float((base / "cpu.cfs_quota_us").read_text())
            period = float((base / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return _quota(quota, period)
    return None


def cgroup_cpu_limit(root: Path = _CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """CPUs granted by the cgroup CPU quota, or ``None`` where there is none.

    ``root`` and ``proc_cgroup`` (the text of ``/proc/self/cgroup``) are
    parameters for the tests.
    """
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            proc_cgroup = ""
    limit = _v2_limit(root, proc_cgroup)
    if limit is None:
        limit = _v1_limit(root)
    return limit


@lru_cache(maxsize=1)
def usable_cpus() -> int:
    """CPUs to size thread pools by: affinity, capped by the cgroup quota.

    >>> usable_cpus() >= 1
    True
    """
    override = os.environ.get("CACHEBUILD_CPUS", "").strip()
    if override.isdigit() and int(override) > 0:
        return int(override)
    cpus = _affinity_cpus()
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)
