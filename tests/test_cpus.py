"""A pool sizes itself by the CPUs it may use (pool.cpus): its affinity and its cgroup's CPU
limit, not the machine's cores. The cgroup reading on file trees laid out as the kernel lays
them out (v2, v1, nested, a container's view), then real `pool serve` processes under one
core's affinity and under a real CPU limit."""

from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest

from pool import config
from pool.cpus import (
    CorePlan,
    Cpus,
    cgroup_cpu_limit,
    core_list_text,
    parse_core_list,
    plan_cores,
    reserved_cores,
    usable_cpus,
)
from router.client import Client
from tests.support import SENTENCES, run_cli, start_pool, stop_pool
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


# --cpu-affinity: the plan (pure), then a real pool whose threads are where the plan says.

def test_core_lists_read_and_written_as_taskset_writes_them() -> None:
    assert parse_core_list("0-3,8") == (0, 1, 2, 3, 8)
    assert parse_core_list(" 5 , 1-2 ") == (1, 2, 5)
    assert core_list_text((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8"
    for bad in ("", "a", "1-", "3-1", "1,,2", "-2"):
        with pytest.raises(ValueError, match=r"core list|low to high"):
            parse_core_list(bad)


def test_auto_gives_passes_every_core_but_the_first() -> None:
    four = (0, 1, 2, 3)
    assert reserved_cores("auto", four, Cpus(4, 4, None)) == (1, 2, 3)
    plan = plan_cores("auto", (1, 2, 3), four, workers=1, threads=2)
    assert plan == CorePlan(serving=(0, 1), passes=((2, 3),))  # the last cores, the rest serve
    assert plan.cores == four
    assert plan.passes_of(0) == plan.passes_of(1) == (2, 3)  # a slot beyond shares
    assert "worker 0 on 2-3; router, intake and loading on 0-1" in plan.describe()
    with pytest.raises(ValueError, match="needs 2 cores"):
        reserved_cores("auto", (5,), Cpus(1, 1, None))
    with pytest.raises(ValueError, match=r"limits it to 3\.5.*cpuset"):
        reserved_cores("auto", tuple(range(8)), Cpus(4, 8, 3.5))  # a share of shared cores


def test_named_cores_are_split_among_the_workers_and_must_fit() -> None:
    allowed = tuple(range(8))
    cores = reserved_cores("2-7", allowed, Cpus(8, 8, None))
    plan = plan_cores("2-7", cores, allowed, workers=3, threads=2)
    assert plan.passes == ((2, 3), (4, 5), (6, 7)) and plan.serving == (0, 1)
    with pytest.raises(ValueError, match=r"2 worker.*x 2 thread.*need 4 cores.*gives them 6"):
        plan_cores("2-7", cores, allowed, workers=2, threads=2)
    with pytest.raises(ValueError, match="need 8 cores"):
        plan_cores("2-7", cores, allowed, workers=4, threads=2)
    with pytest.raises(ValueError, match=r"core\(s\) 8-10 are not among .*\(0-7\)"):
        reserved_cores("6-10", allowed, Cpus(8, 8, None))
    with pytest.raises(ValueError, match="leaves no core for the router"):
        reserved_cores("0-7", allowed, Cpus(8, 8, None))


def flag_values(**given: object) -> dict:
    return {**{name: config.flag_default(spec, name) for name, _, spec in config.flags()},
            "model": "echo", **given}


def test_workers_and_threads_default_to_the_passes_cores(monkeypatch) -> None:
    from pool import settings as settings_module

    monkeypatch.setattr(settings_module, "allowed_cores", lambda: (0, 1, 2, 3, 4))
    monkeypatch.setattr(settings_module, "usable_cpus", lambda: Cpus(5, 5, None))
    monkeypatch.setattr(config, "usable_cpus", lambda: Cpus(5, 5, None))
    values = flag_values(model="transformer", path="echo", devices="cpu")
    monkeypatch.setattr(settings_module, "check_model_dir", lambda path: None)
    settings = settings_module.resolve_settings({**values, "cpu_affinity": "AUTO"},
                                                model_path=lambda p: p)
    assert (settings.workers, settings.threads) == (4, 1)
    assert settings.cpu_affinity == CorePlan((0,), ((1,), (2,), (3,), (4,)))
    settings = settings_module.resolve_settings(
        {**values, "cpu_affinity": "1-4", "workers": 2}, model_path=lambda p: p)
    assert (settings.workers, settings.threads) == (2, 2)
    assert settings.cpu_affinity == CorePlan((0,), ((1, 2), (3, 4)))
    off = settings_module.resolve_settings(values, model_path=lambda p: p)
    assert off.cpu_affinity is None and off.workers == 5  # sized by every usable core
    with pytest.raises(ValueError, match="GPUs"):
        settings_module.resolve_settings({**values, "cpu_affinity": "auto",
                                          "devices": "cuda:0"}, model_path=lambda p: p)
    with pytest.raises(ValueError, match="echo model has no forward passes"):
        settings_module.resolve_settings({**flag_values(), "cpu_affinity": "auto"})


def allowed_list(pid: int, tid: int) -> tuple[int, ...]:
    """A thread's affinity, as the kernel reports it."""
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("Cpus_allowed_list:"))
    return parse_core_list(line.split(":", 1)[1])


def thread_affinities(pid: int) -> list[tuple[int, ...]]:
    return [allowed_list(pid, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]


def test_a_pinned_pool_runs_passes_on_their_cores_through_a_rotation(models) -> None:
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    if len(allowed) < 2:
        pytest.skip("--cpu-affinity needs 2 cores; this test process may use 1")
    passes = allowed[-1:]
    pool = start_pool(models["v1"], "--cpu-affinity", "auto", workers=1)
    try:
        status = pool.status()
        assert status["settings"]["cpu_affinity"] == {"serving": list(allowed[:-1]),
                                                      "passes": [list(passes)]}
        assert status["system"]["cpus_usable"] == len(allowed)  # the pool's, not its router's
        assert set(thread_affinities(pool.process.pid)) == {allowed[:-1]}
        assert_worker_pinned(status["workers"][0], passes, allowed[:-1])
        with Client(pool.endpoint, timeout=30) as client:
            answer = client.similarity([(SENTENCES[0], SENTENCES[1])])
        assert answer.version == "v1" and -1.0 <= answer.scores[0] <= 1.0
        shown = run_cli("status", env=pool.env)
        assert shown.returncode == 0, shown.stderr
        assert f"cpu {core_list_text(passes)}" in shown.stdout, shown.stdout
        assert "CPU affinity: passes: worker 0 on" in shown.stdout, shown.stdout

        done = run_cli("rotate", "--version", "v2", "--path", str(models["v2"]), "--json",
                       env=pool.env)
        assert done.returncode == 0, done.stdout + done.stderr
        (worker,) = pool.status()["workers"]
        assert worker["version"] == "v2"
        assert_worker_pinned(worker, passes, allowed[:-1])  # the slot's cores, again
    finally:
        stop_pool(pool)


def assert_worker_pinned(worker: dict, passes: tuple[int, ...],
                         serving: tuple[int, ...]) -> None:
    assert worker["passes_cores"] == list(passes)
    pid = worker["pid"]
    deadline = time.monotonic() + 10  # the device thread pins itself once it starts
    while passes not in thread_affinities(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    affinities = thread_affinities(pid)
    assert affinities.count(passes) == 1, affinities  # its device thread, and no other
    assert all(a == serving for a in affinities if a != passes), affinities
