"""How many cores this process may really use: the thread pools of retrieval, projections and validation are
sized by it.

`os.cpu_count()` counts the host's cores; in a container limited with a CPU quota (`docker --cpus 2`, a Kubernetes
CPU limit) that overstates what the process gets, and pools sized by it oversubscribe the quota: threads wait for
their slice and spinning BLAS pools steal it. The answer is the CPU affinity, lowered by the cgroup quota when one
is set (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded up (1.5 CPUs run 2
threads), never below 1.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_V2_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_DIR = Path("/sys/fs/cgroup/cpu")


def cgroup_cpu_quota() -> float | None:
    """CPUs granted by the cgroup quota (e.g. 1.5), or None when there is none or it cannot be read."""
    try:
        quota, period = CGROUP_V2_MAX.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((CGROUP_V1_DIR / "cpu.cfs_quota_us").read_text())
        period = int((CGROUP_V1_DIR / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def available_cores() -> int:
    """The cores this process may use (see the module docstring)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)
