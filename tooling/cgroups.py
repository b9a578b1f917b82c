"""A cgroup with a CPU limit, for the processes a test or a benchmark starts: a container's
CPU limit (Kubernetes' `resources.limits.cpu`) on one machine. Needs root and cgroup v2, or
v1's cpu controller.

    with cpu_limited("zp-test", cores=1.0) as group:
        start_pool(..., prefix=group.prefix)   # the pool, and all it forks, inside it
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pool.cpus import CGROUP_ROOT, v1_cpu_mount

PERIOD_US = 100_000  # the kernel's default period


@dataclass(frozen=True)
class LimitedGroup:
    path: Path

    @property
    def prefix(self) -> tuple[str, ...]:
        """A command prefix that moves itself into the group, then execs the rest."""
        return ("sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path))

    def throttled_s(self) -> float:
        """Seconds the group's processes were held back by its limit so far."""
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        if "throttled_usec" in stat:  # v2
            return int(stat["throttled_usec"]) / 1e6
        return int(stat["throttled_time"]) / 1e9


def unavailable() -> str:
    """Why no CPU-limited cgroup can be made here; "" where one can."""
    if os.geteuid() != 0:
        return "making a cgroup needs root"
    if v1_cpu_mount() is None and not (CGROUP_ROOT / "cgroup.subtree_control").is_file():
        return f"no cgroup cpu controller under {CGROUP_ROOT}"
    try:
        with cpu_limited(f"zp-probe-{os.getpid()}", 1.0):
            return ""
    except OSError as exc:
        return f"cannot make a cgroup with a CPU limit: {exc}"


@contextmanager
def cpu_limited(name: str, cores: float) -> Iterator[LimitedGroup]:
    """A new cgroup holding its processes to `cores` cores' time; removed at the end, which
    fails (OSError) if a process started in it is still alive."""
    mount = v1_cpu_mount()
    if mount is None:  # v2: the root's children get the cpu controller
        mount = CGROUP_ROOT
        (mount / "cgroup.subtree_control").write_text("+cpu")
    group = mount / name
    group.mkdir()
    try:
        quota = int(cores * PERIOD_US)
        if (group / "cpu.max").exists():
            (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        yield LimitedGroup(group)
    finally:
        group.rmdir()
