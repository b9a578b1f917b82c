"""A pool sizes itself by the CPUs it may use (pool.cpus): its affinity and its cgroup's CPU
limit, not the machine's cores. The cgroup reading on file trees laid out as the kernel lays
them out (v2, v1, nested, a container's view), then real `pool serve` processes under one
core's affinity and under a real CPU limit."""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest

from pool import config
from pool.cpus import Cpus, cgroup_cpu_limit, usable_cpus
from tests.support import run_cli, start_pool, stop_pool
from tooling import cgroups


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def proc_cgroup(tmp_path: Path, *lines: str) -> Path:
    write(tmp_path / "proc-cgroup", "\n".join(lines) + "\n")
    return tmp_path / "proc-cgroup"


def test_cgroup_v2_the_tightest_limit_of_the_group_and_its_parents(tmp_path) -> None:
    root = tmp_path / "fs"
    write(root / "cpu.max", "max 100000\n")  # the root cgroup has none; read all the same
    write(root / "kubepods/cpu.max", "max 100000\n")
    write(root / "kubepods/pod1/cpu.max", "350000 100000\n")  # the pod: 3.5 cores
    write(root / "kubepods/pod1/ctr/cpu.max", "max 100000\n")  # the container: unlimited
    proc = proc_cgroup(tmp_path, "0::/kubepods/pod1/ctr")
    assert cgroup_cpu_limit(proc, root) == 3.5
    write(root / "kubepods/pod1/ctr/cpu.max", "150000 100000\n")
    assert cgroup_cpu_limit(proc, root) == 1.5
    write(root / "kubepods/pod1/cpu.max", "50000 100000\n")  # a parent tighter than its child
    assert cgroup_cpu_limit(proc, root) == 0.5


def test_cgroup_v1_quota_over_period_and_minus_one_for_none(tmp_path) -> None:
    root = tmp_path / "fs"
    group = root / "cpu,cpuacct/docker/abc"
    write(group / "cpu.cfs_quota_us", "-1\n")
    write(group / "cpu.cfs_period_us", "100000\n")
    proc = proc_cgroup(tmp_path, "12:memory:/docker/abc", "4:cpu,cpuacct:/docker/abc",
                       "2:cpuacct:/", "0::/")
    assert cgroup_cpu_limit(proc, root) is None
    write(group / "cpu.cfs_quota_us", "250000\n")
    assert cgroup_cpu_limit(proc, root) == 2.5


def test_a_container_that_sees_its_own_cgroup_as_the_mount(tmp_path) -> None:
    # Without a cgroup namespace /proc names the host's path, which the container's mount of
    # its own cgroup does not hold: the mount itself is the container's group.
    root = tmp_path / "fs"
    write(root / "cpu.max", "200000 100000\n")
    assert cgroup_cpu_limit(proc_cgroup(tmp_path, "0::/kubepods/pod9/ctr"), root) == 2.0


def test_no_cgroup_file_system_or_unreadable_files_mean_no_limit(tmp_path) -> None:
    assert cgroup_cpu_limit(tmp_path / "absent", tmp_path) is None
    root = tmp_path / "fs"
    write(root / "cpu.max", "garbage\n")
    assert cgroup_cpu_limit(proc_cgroup(tmp_path, "0::/"), root) is None


def test_usable_cpus_round_a_limit_up_within_the_affinity(tmp_path) -> None:
    affinity = len(os.sched_getaffinity(0))
    root = tmp_path / "fs"
    proc = proc_cgroup(tmp_path, "0::/")
    write(root / "cpu.max", "30000 100000\n")  # 0.3 of a core: still one
    assert usable_cpus(proc, root) == Cpus(1, affinity, 0.3)
    write(root / "cpu.max", f"{affinity * 100000 + 50000} 100000\n")  # more than it may run on
    assert usable_cpus(proc, root).usable == affinity


def test_defaults_follow_the_usable_cpus_not_the_machine(monkeypatch) -> None:
    monkeypatch.setattr(config, "usable_cpus", lambda: Cpus(4, 64, 3.5))
    assert config.default_workers(["cpu"]) == 4
    assert config.default_threads(["cpu"], 2) == 2
    assert config.default_threads(["cpu"], 8) == 1
    assert config.default_tokenizer_threads(["cuda:0"], 1) == 3


def pinned_to_one_core() -> tuple[str, ...]:
    """A command prefix that sets its affinity to one core, then execs the rest."""
    core = min(os.sched_getaffinity(0))
    return (sys.executable, "-c", f"import os, sys; os.sched_setaffinity(0, {{{core}}}); "
            "os.execvp(sys.argv[1], sys.argv[1:])")


@pytest.mark.parametrize("confined", ["affinity", "cgroup"])
def test_a_pool_confined_to_one_core_starts_one_worker_of_one_thread(
        models, tmp_path, confined) -> None:
    if confined == "cgroup" and (why := cgroups.unavailable()):
        pytest.skip(f"{why}; run the suite as root")
    confinement = cgroups.cpu_limited(f"zp-test-{os.getpid()}", 1.0) \
        if confined == "cgroup" else nullcontext()
    with confinement as group:
        pool = start_pool(models["v1"], workers=None,
                          prefix=group.prefix if group else pinned_to_one_core())
        try:
            status = pool.status()
            assert status["settings"]["workers"] == 1 and status["settings"]["threads"] == 1
            assert len(status["workers"]) == 1
            system = status["system"]
            assert system["cpus_usable"] == 1
            assert system["cpu_limit"] == (1.0 if group else None)
            shown = run_cli("status", env=pool.env)
            assert shown.returncode == 0, shown.stderr
            if system["cpu_count"] > 1:
                assert "(1 usable" in shown.stdout, shown.stdout
            if group:
                assert "a CPU limit of 1)" in shown.stdout, shown.stdout
        finally:
            stop_pool(pool)
