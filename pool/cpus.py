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


def usable_cpus(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT,
                cores: tuple[int, ...] | None = None) -> Cpus:
    """This process's CPUs (never fewer than one usable). `cores`: the pool's, where
    --cpu-affinity pinned this process to a part of them."""
    if cores is not None:
        affinity = len(cores)
    elif hasattr(os, "sched_getaffinity"):
        affinity = len(os.sched_getaffinity(0))
    else:
        affinity = os.cpu_count() or 1
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


# --cpu-affinity: each worker's forward passes on cores of their own, everything else (the
# router, each worker's intake and tokenizer threads, a new version's loading) on the rest.
# On 2 cores a tiny model's pool served 6-8% more pinned than with the kernel placing every
# thread (interleaved rounds): unpinned, the router and the intake preempt the device thread
# on its core (docs/benchmarks.md, session 25). Off by default: pools that share a machine's
# cores without cpusets would all pin their passes to the same cores.
AFFINITY_OFF = "off"
AFFINITY_AUTO = "auto"  # every usable core but the first for passes
MAX_DEFAULT_WORKERS = 8  # a pool sized by its cores starts no more workers than this


@dataclass(frozen=True, slots=True)
class CorePlan:
    """Where a pool's threads run: `passes[i]` are the cores of worker slot i's forward
    passes (its device thread and torch's threads), `serving` those of everything else."""

    serving: tuple[int, ...]
    passes: tuple[tuple[int, ...], ...]

    @property
    def cores(self) -> tuple[int, ...]:
        """All of the pool's."""
        return tuple(sorted({*self.serving, *(c for cores in self.passes for c in cores)}))

    def passes_of(self, slot: int) -> tuple[int, ...]:
        """A slot beyond the plan's (a rotation to more workers) shares a planned slot's."""
        return self.passes[slot % len(self.passes)]

    def describe(self) -> str:
        slots = ", ".join(f"worker {i} on {core_list_text(cores)}"
                          for i, cores in enumerate(self.passes))
        return f"passes: {slots}; router, intake and loading on {core_list_text(self.serving)}"


def parse_core_list(text: str) -> tuple[int, ...]:
    """"0-3,8" -> (0, 1, 2, 3, 8), as taskset and cpusets write core lists."""
    cores: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{text!r} is not a core list: expected cores like 3, or 2-5,8")
        low, high = int(first), int(last or first)
        if high < low:
            raise ValueError(f"{part.strip()!r} in {text!r}: a range runs from low to high")
        cores.update(range(low, high + 1))
    return tuple(sorted(cores))


def core_list_text(cores: tuple[int, ...] | list[int]) -> str:
    """(0, 1, 2, 5) -> "0-2,5"."""
    runs: list[list[int]] = []
    for core in sorted(cores):
        if runs and core == runs[-1][1] + 1:
            runs[-1][1] = core
        else:
            runs.append([core, core])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def allowed_cores() -> tuple[int, ...]:
    return tuple(sorted(os.sched_getaffinity(0)))


def reserved_cores(setting: str, allowed: tuple[int, ...], cpus: Cpus) -> tuple[int, ...] | None:
    """The cores --cpu-affinity gives to forward passes (None: off). ValueError saying why
    a setting cannot be followed on this machine."""
    if setting == AFFINITY_OFF:
        return None
    name = f"--cpu-affinity {setting}"
    if setting == AFFINITY_AUTO:
        if cpus.limit is not None and cpus.limit < cpus.affinity:
            raise ValueError(
                f"{name}: this process may run on {cpus.affinity} cores but its cgroup limits "
                f"it to {cpus.limit:g}: it shares them with other containers, and pinning would "
                "stack every pool's passes on the same cores. Give the container cores of its "
                "own (a cpuset: Kubernetes' static CPU manager), or name the cores")
        if len(allowed) < 2:
            raise ValueError(f"{name}: needs 2 cores, one for passes and one for the router; "
                             f"this process may use {core_list_text(allowed)}")
        return allowed[1:]
    cores = parse_core_list(setting)
    outside = [c for c in cores if c not in allowed]
    if outside:
        raise ValueError(f"{name}: core(s) {core_list_text(outside)} are not among those this "
                         f"process may use ({core_list_text(allowed)})")
    if len(cores) == len(allowed):
        raise ValueError(f"{name}: leaves no core for the router and the workers' intake; "
                         f"this process may use {core_list_text(allowed)}")
    return cores


def plan_cores(setting: str, reserved: tuple[int, ...], allowed: tuple[int, ...],
               workers: int, threads: int) -> CorePlan:
    """`threads` consecutive reserved cores per worker slot (from the last), the other allowed
    cores for the rest. Cores named in `setting` must all be used; auto's may be left over."""
    needed = workers * threads
    exact = setting != AFFINITY_AUTO
    if needed > len(reserved) or (exact and needed != len(reserved)):
        raise ValueError(
            f"--cpu-affinity {setting}: {workers} worker(s) x {threads} thread(s) need {needed} "
            f"cores for their passes, and it gives them {len(reserved)} (core(s) "
            f"{core_list_text(reserved)}): size --workers and --threads to them, or leave "
            "either out to have it sized")
    used = reserved[len(reserved) - needed:]
    passes = tuple(used[i * threads:(i + 1) * threads] for i in range(workers))
    return CorePlan(tuple(c for c in allowed if c not in used), passes)


def pin_process(cores: tuple[int, ...]) -> None:
    """Every thread of this process to `cores` (threads started later inherit it, as do
    processes forked or spawned from it)."""
    for task in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(task), cores)


def pin_this_thread(cores: tuple[int, ...]) -> None:
    os.sched_setaffinity(0, cores)  # Linux: 0 is the calling thread, not the process
