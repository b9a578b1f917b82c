"""Supervision of real worker processes: respawn with backoff, crash loops reported."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from pool import config
from router.client import Client, WorkerFailed
from tests.support import Load, run_cli, start_pool, wait_for

pytestmark = pytest.mark.slow


def wait_for_ready_worker(pool, not_pids: set[int], timeout: float = 60) -> int:
    """The pid of a ready worker that is none of `not_pids`."""

    def new_ready() -> int | None:
        return next((w["pid"] for w in pool.status()["workers"]
                     if w["state"] == "ready" and w["pid"] not in not_pids), None)

    return wait_for(new_ready, timeout, f"a new ready worker within {timeout}s", poll=0.1)


CRASH_RETRY_S = 12.0  # long enough for the checks below to run before the retry, on a slow CI


def test_a_crash_loop_is_reported_answered_at_once_and_retried_until_it_serves(
    pool_factory, models: dict[str, Path]
) -> None:
    pool = pool_factory(models["v1"], "--crash-retry", str(CRASH_RETRY_S), workers=1)
    killed: set[int] = set()
    for _ in range(config.CRASH_LOOP_LIMIT):
        pid = wait_for_ready_worker(pool, killed)
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
    deadline = time.monotonic() + 10
    while not (status := pool.status())["versions"]["v1"]["crash_loop"]:
        assert time.monotonic() < deadline, status["versions"]
        time.sleep(0.1)
    v1 = status["versions"]["v1"]
    assert "crash loop" in v1["failed"] and v1["restarts"] == config.CRASH_LOOP_LIMIT
    assert 0 < v1["next_try_s"] <= CRASH_RETRY_S
    # Not spun: no worker until the retry is due. Meanwhile the pool stays up and answers
    # at once, rather than holding producers until their timeouts.
    time.sleep(CRASH_RETRY_S / 4)
    assert pool.status()["workers"] == []
    assert pool.process.proc.poll() is None
    with Client(pool.endpoint, timeout=5) as client:
        assert client.ping().workers == 0
        with pytest.raises(WorkerFailed, match="crash loop"):
            client.similarity([("a", "b")], timeout=2)
    health = run_cli("health", "--json", env=pool.env)
    assert health.returncode == 2 and "crash loop" in health.stdout
    shown = run_cli("status", env=pool.env).stdout
    assert "v1: crash loop" in shown and "next try in" in shown, shown
    # The cause went away (nobody kills the next worker): the version serves again.
    wait_for_ready_worker(pool, killed, timeout=CRASH_RETRY_S + 60)
    with Client(pool.endpoint, timeout=10) as client:
        assert len(client.similarity([("a", "b")], timeout=10).scores) == 1
    v1 = pool.status()["versions"]["v1"]
    assert v1["failed"] is None and v1["crash_loop"] is None and v1["next_try_s"] is None
    health = run_cli("health", "--json", env=pool.env)
    assert health.returncode == 1, health.stdout  # degraded: crashes in the last minute


def test_one_crash_looping_worker_does_not_take_down_the_ones_that_serve(
    pool_factory, models: dict[str, Path]
) -> None:
    pool = pool_factory(models["v1"], "--crash-retry", "600")
    steady = next(w for w in pool.status()["workers"] if w["id"].startswith("v1-1-"))
    load = Load(pool.endpoint, in_flight=8).start()
    killed: set[int] = set()
    for _ in range(config.CRASH_LOOP_LIMIT):
        deadline = time.monotonic() + 60
        while not (flaky := [w for w in pool.status()["workers"] if w["id"].startswith("v1-0-")
                             and w["state"] == "ready" and w["pid"] not in killed]):
            assert time.monotonic() < deadline, pool.status()["workers"]
            time.sleep(0.1)
        os.kill(flaky[0]["pid"], signal.SIGKILL)
        killed.add(flaky[0]["pid"])
    deadline = time.monotonic() + 10
    while not (status := pool.status())["versions"]["v1"]["crash_loop"]:
        assert time.monotonic() < deadline, status["versions"]
        time.sleep(0.1)
    time.sleep(1)
    load.stop()
    # The other worker kept serving throughout: nothing failed, nothing was lost.
    assert load.errors() == [] and load.lost == 0 and len(load.replies) > 20
    assert [w["pid"] for w in status["workers"]] == [steady["pid"]]
    assert status["versions"]["v1"]["failed"] is None
    health = run_cli("health", "--json", env=pool.env)
    assert health.returncode == 1 and "crash loop" in health.stdout  # degraded, not failed


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
    # A new forkserver imports torch and transformers again (6-9 s alone on 2 cores, 30 s and
    # more with the suite beside it); the requests wait for it, past the 30 s default.
    pool = pool_factory(models["v1"], "--queue-timeout", "120")
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
    # Deaths seen in one tick count as one crash (one cause); seen a tick apart, two.
    assert pool.status()["versions"]["v1"]["restarts"] in (1, 2)


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


def test_sigterm_to_the_whole_process_group_answers_everything_without_a_respawn(
        models: dict[str, Path]) -> None:
    # systemd's KillMode=control-group, `kill -TERM -PGID`: the server and every worker get
    # SIGTERM at once. Each worker answers what it holds and exits 0; nothing is respawned.
    pool = start_pool(models["v1"], own_group=True)
    load = Load(pool.endpoint, in_flight=64, max_rate=None)
    load.start()
    wait_for(lambda: len(load.replies) > 500, 60, "500 replies")
    workers = pool.children()
    os.killpg(pool.process.pid, signal.SIGTERM)
    load.stop()  # nothing is sent after this, and all that was sent is answered
    assert pool.process.proc.wait(60) == 0
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers outlived the pool: {[p.pid for p in alive]}"
    codes = Counter(reply.code for reply in load.replies)
    assert load.lost == 0 and set(codes) <= {"ok", "shutting_down"}, codes
    log = (pool.state_dir / "console.log").read_text()
    # Each worker exits 0: on its own SIGTERM, or on the STOP of a pool that drained first
    # (whichever comes first; both leave nothing unanswered). None is a crash.
    assert log.count("stopped on its own") + log.count("exited (code 0)") == 2, log[-3000:]
    assert "died unexpectedly" not in log, log[-3000:]
    assert log.count("spawned worker") == 2, "a worker was started after the SIGTERM"


def test_the_forkserver_preload_leaves_the_collector_on_with_its_imports_frozen() -> None:
    # Its imports run with the collector off (pool.preload); a worker forked from it must
    # collect its own garbage, or it would grow for the rest of its life.
    # (flushed: pool.preload ends the process that imported it without a teardown)
    probe = ("import gc, pool.preload; print(gc.isenabled(), gc.get_freeze_count(), "
             "len(gc.get_objects()), flush=True)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, check=True)
    enabled, frozen, tracked = done.stdout.split()
    assert enabled == "True"
    assert int(frozen) > 100_000 and int(tracked) < 1_000, done.stdout
