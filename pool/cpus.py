"""The CPUs this process may use: its affinity, and its cgroup's CPU limit.

`os.cpu_count()` is the machine's cores. In a container with a CPU limit (Kubernetes'
`resources.limits.cpu`, `docker run --cpus`) or a cpuset (`taskset`, `--cpuset-cpus`, the
kubelet's static CPU manager) a pool sized by it starts a worker and a torch thread per core
of the node: on a 64-core node with a 4-core limit, 8 workers x 8 threads that the kernel
throttles for most of every period. So the pool's defaults (workers, threads, tokenizer
threads) come from `usable_cpus()`: the cores it may run on, and no more than its cgroup's
quota rounded up (as the JVM and Go's runtime do), walking the cgroup's parents too, since a
parent's limit bounds its children. cgroup v2 (`cpu.max`) and v1 (`cpu.cfs_quota_us`) both.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")  # where distributions mount it


@dataclass(frozen=True, slots=True)
class Cpus:
    """What this process may use: `usable` cores (what the pool sizes itself by)."""

    usable: int
    affinity: int  # the cores its affinity mask allows
    limit: float | None  # its cgroup's CPU limit in cores; None: no limit

    def describe(self) -> str:
        where = f"{self.affinity} cores" + (f", a CPU limit of {self.limit:g}"
                                            if self.limit is not None else "")
        return f"{self.usable} usable ({where})"


def usable_cpus(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> Cpus:
    """This process's CPUs (never fewer than one usable)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    limit = cgroup_cpu_limit(proc_cgroup, root)
    usable = affinity if limit is None else min(affinity, math.ceil(limit))
    return Cpus(max(1, usable), affinity, limit)


def cgroup_cpu_limit(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> float | None:
    """The tightest CPU limit on this process's cgroup and its parents, in cores; None where
    there is none, or no cgroup file system to read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2's single hierarchy
            limits += _limits_up(root, path, _v2_limit)
        elif "cpu" in controllers.split(","):
            mount = v1_cpu_mount(root)
            if mount is not None:
                limits += _limits_up(mount, path, _v1_limit)
    return min(limits, default=None)


def v1_cpu_mount(root: Path = CGROUP_ROOT) -> Path | None:
    """Where cgroup v1's cpu controller is mounted under `root`; None without one."""
    return next((root / name for name in V1_CPU_MOUNTS if (root / name).is_dir()), None)


def _limits_up(mount: Path, path: str,
               read: Callable[[Path], float | None]) -> list[float]:
    """The limits of the cgroup at `path` under `mount` and of each parent up to the mount.
    Inside a container the mount is often the container's own cgroup, while /proc names its
    path on the host: where that path is not under the mount, the mount alone is read."""
    here = mount / path.strip("/")
    if not here.is_dir():
        here = mount
    found = []
    while True:
        limit = read(here)
        if limit is not None:
            found.append(limit)
        if here == mount:
            return found
        here = here.parent


def _v2_limit(group: Path) -> float | None:
    """cgroup v2's `cpu.max`: "QUOTA PERIOD" in microseconds, or "max PERIOD"."""
    try:
        quota, period = (group / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_limit(group: Path) -> float | None:
    """cgroup v1's `cpu.cfs_quota_us` over `cpu.cfs_period_us`; a quota of -1: none."""
    try:
        quota = int((group / "cpu.cfs_quota_us").read_text())
        period = int((group / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period
