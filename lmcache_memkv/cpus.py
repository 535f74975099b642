"""How many CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a
container's CPU limit), which ``os.cpu_count`` ignores. The node sizes its transfer slots
and the adapter its I/O threads from it."""

from __future__ import annotations

import os

CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def usable_cpus(cpu_max: str = CGROUP_CPU_MAX) -> int:
    """CPUs this process may run on at once (at least 1); a limit of 2.5 CPUs counts as 3."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        with open(cpu_max) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, -(-int(quota) // int(period)))
    except (OSError, ValueError, ZeroDivisionError):
        pass  # no cgroup v2 quota visible (or none that reads right): the affinity stands
    return max(1, cpus)
