"""Supervision of real worker processes: respawn with backoff, crash loops reported."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from pool import config as c
from router.client import Client, WorkerFailed
from tests.conftest import run_cli
from tests.loadgen import Load

pytestmark = pytest.mark.slow


def wait_for_ready_worker(pool, not_pids: set[int], timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in pool.status()["workers"]:
            if worker["state"] == "ready" and worker["pid"] not in not_pids:
                return worker["pid"]
        time.sleep(0.1)
    raise AssertionError(f"no new ready worker within {timeout}s: {pool.status()['workers']}")


def test_a_crash_loop_is_detected_and_reported_not_spun(pool_factory,
                                                        models: dict[str, Path]) -> None:
    pool = pool_factory(models["v1"], workers=1)
    killed: set[int] = set()
    for _ in range(c.CRASH_LOOP_LIMIT):
        pid = wait_for_ready_worker(pool, killed)
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
    deadline = time.monotonic() + 10
    while not (status := pool.status())["versions"]["v1"]["failed"]:
        assert time.monotonic() < deadline, status["versions"]
        time.sleep(0.1)
    assert "crash loop" in status["versions"]["v1"]["failed"]
    assert status["versions"]["v1"]["restarts"] == c.CRASH_LOOP_LIMIT
    time.sleep(2 * c.TICK_S + max(c.RESPAWN_BACKOFF_S[: c.CRASH_LOOP_LIMIT]))
    assert pool.status()["workers"] == [], "a failed version must not be respawned"
    # The pool itself stays up and says so, rather than hanging producers.
    assert pool.process.proc.poll() is None
    with Client(pool.endpoint, timeout=5) as client:
        assert client.ping().workers == 0
        with pytest.raises(WorkerFailed, match="crash loop"):  # at once, not after a timeout
            client.similarity([("a", "b")], timeout=2)


def forkserver_of(pool) -> psutil.Process:
    """The one process every worker was forked from: a child of the server."""
    parents = {psutil.Process(pid).ppid() for pid in pool.worker_pids()}
    assert len(parents) == 1, parents
    forkserver = psutil.Process(parents.pop())
    assert forkserver.pid != pool.process.pid and forkserver.ppid() == pool.process.pid
    return forkserver


def test_a_killed_forkserver_is_a_crash_of_every_worker_and_nothing_is_lost(
    pool_factory, models: dict[str, Path]
) -> None:
    pool = pool_factory(models["v1"])
    assert pool.status()["settings"]["start_method"] == "forkserver"  # auto on a CPU pool
    old_pids = set(pool.worker_pids())
    forkserver = forkserver_of(pool)
    load = Load(pool.endpoint, in_flight=16).start()
    time.sleep(1)
    forkserver.kill()
    # Its workers die with it (PDEATHSIG); new ones come from a new forkserver.
    deadline = time.monotonic() + 90
    while not ((pids := set(pool.worker_pids())) and not pids & old_pids and all(
            w["state"] == "ready" for w in pool.status()["workers"]) and len(pids) == 2):
        assert time.monotonic() < deadline, pool.status()["workers"]
        time.sleep(0.2)
    time.sleep(1)
    load.stop()
    assert load.errors() == [] and load.lost == 0
    assert len(load.replies) > 50
    assert not any(psutil.pid_exists(pid) for pid in old_pids)
    assert forkserver_of(pool).pid != forkserver.pid
    assert pool.status()["versions"]["v1"]["restarts"] == 2


def test_spawn_start_method_serves_with_workers_as_children_of_the_server(
    pool_factory, models: dict[str, Path], reference
) -> None:
    pool = pool_factory(models["v1"], "--start-method", "spawn")
    assert pool.status()["settings"]["start_method"] == "spawn"
    assert {psutil.Process(pid).ppid() for pid in pool.worker_pids()} == {pool.process.pid}
    with Client(pool.endpoint) as client:
        score = client.similarity([("今天天气真好", "今日阳光明媚")]).scores[0]
    assert score == pytest.approx(reference["v1"].similarity("今天天气真好", "今日阳光明媚"),
                                  abs=1e-5)


def test_an_unknown_start_method_is_refused_before_anything_starts(
    models: dict[str, Path], tmp_path: Path
) -> None:
    done = run_cli("serve", "--path", str(models["v1"]), "--start-method", "fork",
                   "--state-dir", str(tmp_path), env=dict(os.environ), timeout=60)
    assert done.returncode == 2
    assert "--start-method must be one of auto, spawn, forkserver, not 'fork'" in done.stderr
