"""Supervision of real worker processes: respawn with backoff, crash loops reported."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from pool import config as c
from router.client import Client, WorkerFailed

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
