"""Chaos: floods beyond capacity, kill -9 of workers mid-rotation, kill -9 of the supervisor.

`pytest -m chaos` runs these alone. ZEROPOOL_CHAOS_SECONDS (default 15) sets how long the
flood lasts and how long the kill loops go on: set it to hours for a soak, e.g.
`ZEROPOOL_CHAOS_SECONDS=3600 .venv/bin/pytest -m chaos`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import psutil
import pytest

from pool import config
from pool.control import control_request
from router.client import Client
from tests.support import SENTENCES, Load, RunningPool, run_cli, start_pool, stop_pool
from tooling.loadgen import ThreadLoad

pytestmark = [pytest.mark.chaos, pytest.mark.slow]
CHAOS_SECONDS = float(os.environ.get("ZEROPOOL_CHAOS_SECONDS", "15"))
FLOOD_FACTOR = 10
ACCEPTED_UNDER_FLOOD = {"ok", "overloaded", "timeout"}


def pool_rss(pool: RunningPool) -> int:
    procs = [psutil.Process(pool.process.pid), *pool.children()]
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def capacity(endpoint: str, seconds: float = 3.0) -> float:
    """Replies per second the pool sustains with 64 requests in flight."""
    load = Load(endpoint, in_flight=64, max_rate=None).start()
    time.sleep(seconds)
    load.stop()
    assert not load.errors() and load.lost == 0
    return len(load.replies) / seconds


class Flood:
    """Open loop: sends at `rate` whatever comes back, and reads every reply (ThreadLoad)."""

    def __init__(self, endpoint: str, rate: float) -> None:
        self.load = ThreadLoad(endpoint, SENTENCES, rate=rate, offset=1, drain_s=120)

    def start(self) -> Flood:
        self.load.start()
        return self

    def stop(self) -> None:
        self.load.stop(timeout=180)

    @property
    def sent(self) -> int:
        return self.load.sent

    @property
    def replies(self) -> dict[bytes, list[str]]:
        """Request id -> the codes of every reply it got (one, unless the pool repeated)."""
        out: dict[bytes, list[str]] = {}
        for reply in [*self.load.replies, *self.load.repeats]:
            out.setdefault(reply.request_id, []).append(reply.code)
        return out

    def codes(self) -> dict[str, int]:
        return self.load.codes()


def test_a_flood_at_ten_times_capacity_through_a_rotation(pool_factory,
                                                           models: dict[str, Path]) -> None:
    pool = pool_factory(models["v1"], "--max-queue", "256", "--queue-timeout", "2")
    rate = FLOOD_FACTOR * capacity(pool.endpoint)
    rss_before = pool_rss(pool)
    flood = Flood(pool.endpoint, rate).start()
    rss_peak = rss_before
    deadline = time.monotonic() + CHAOS_SECONDS
    rotated = False
    while time.monotonic() < deadline:
        if not rotated and time.monotonic() > deadline - CHAOS_SECONDS * 2 / 3:
            done = run_cli("rotate", "--version", "v2", "--path", str(models["v2"]),
                           "--no-wait", "--json", env=pool.env)
            assert done.returncode == 0, done.stdout + done.stderr
            rotated = True
        time.sleep(1.0)
        rss_peak = max(rss_peak, pool_rss(pool))
    flood.stop()

    assert flood.sent == len(flood.replies), f"{flood.sent - len(flood.replies)} unanswered"
    twice = [rid for rid, codes in flood.replies.items() if len(codes) != 1]
    assert not twice, f"{len(twice)} requests answered more than once"
    codes = flood.codes()
    assert set(codes) <= ACCEPTED_UNDER_FLOOD, codes
    assert codes.get("overloaded", 0) > 0, f"the flood never exceeded capacity: {codes}"
    assert codes.get("ok", 0) > 0
    # The bounded queue and high-water marks bound memory; rotation adds a second set of
    # workers for a while, which is what the allowance is for.
    assert rss_peak < 2.5 * rss_before + 200 * 2**20, (rss_before, rss_peak)

    rot = control_request(pool.state_dir, "rotation")["rotation"]
    deadline = time.monotonic() + 120
    while rot["outcome"] is None and time.monotonic() < deadline:
        time.sleep(0.5)
        rot = control_request(pool.state_dir, "rotation")["rotation"]
    assert rot["outcome"] == "done", rot
    started = time.monotonic()
    with Client(pool.endpoint, timeout=10) as client:  # service resumes at once
        assert client.similarity([("今天天气真好", "今日阳光明媚")]).version == "v2"
    assert time.monotonic() - started < 5
    assert pool.status()["queue_depth"] == 0


def test_rotations_while_workers_are_killed_lose_nothing(pool_factory,
                                                          models: dict[str, Path]) -> None:
    pool = pool_factory(models["v1"])
    rng = random.Random(7)
    load = Load(pool.endpoint, in_flight=32).start()
    deadline = time.monotonic() + CHAOS_SECONDS
    target, rotations = "v2", 0
    kills: dict[str, list[float]] = {"v1": [], "v2": []}
    while time.monotonic() < deadline or rotations < 2:
        done = run_cli("rotate", "--version", target, "--path", str(models[target]),
                       "--no-wait", "--json", env=pool.env)
        assert done.returncode == 0, done.stdout + done.stderr
        while True:
            time.sleep(rng.uniform(0.2, 1.5))
            rot = control_request(pool.state_dir, "rotation")["rotation"]
            if rot["outcome"] is not None:
                break
            victims = [w for w in pool.status()["workers"] if may_kill(kills[w["version"]])]
            if victims:
                victim = rng.choice(victims)
                try:
                    os.kill(victim["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    continue  # it exited on its own (drained) since the status was read
                kills[victim["version"]].append(time.monotonic())
        rotations += 1
        if rot["outcome"] == "done":
            target = "v1" if target == "v2" else "v2"
        # let the pool settle back to full strength before the next round
        wait_until_full(pool, workers=2)
    load.stop()

    assert load.lost == 0
    assert load.errors() == [], load.errors()[:3]
    assert sum(len(x) for x in kills.values()) > 0
    st = pool.status()
    assert st["active"] in ("v1", "v2")
    assert all(w["state"] == "ready" for w in st["workers"])
    registry = json.loads((pool.state_dir / "versions.json").read_text())
    assert registry["active"] == st["active"]


def may_kill(recent: list[float]) -> bool:
    """Stay under the crash-loop limit: that many deaths in the window put a version in a
    crash loop on purpose (test_supervision.py), which is not what this test is about."""
    now = time.monotonic()
    return sum(now - t < config.CRASH_LOOP_WINDOW_S for t in recent) < config.CRASH_LOOP_LIMIT - 2


def wait_until_full(pool: RunningPool, workers: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = pool.status()
        ready = [w for w in st["workers"] if w["state"] == "ready"]
        if len(ready) == workers and len(st["workers"]) == workers:
            return
        time.sleep(0.3)
    raise AssertionError(f"the pool did not come back to {workers} ready workers: "
                         f"{st['versions']}, {st['workers']}, {st['events'][-8:]}")


def test_supervisor_kill_9_mid_rotation_then_restart(models: dict[str, Path]) -> None:
    rng = random.Random(11)
    pool = start_pool(models["v1"], workers=1)
    state_dir = pool.state_dir
    deadline = time.monotonic() + CHAOS_SECONDS
    target, rounds = "v2", 0
    try:
        while time.monotonic() < deadline or rounds < 2:
            done = run_cli("rotate", "--version", target, "--path", str(models[target]),
                           "--no-wait", "--json", env=pool.env)
            assert done.returncode == 0, done.stdout + done.stderr
            time.sleep(rng.uniform(0.0, 4.0))
            workers = pool.children()
            os.kill(pool.process.pid, signal.SIGKILL)
            pool.process.proc.wait(10)
            # The workers notice their parent is gone and exit on their own.
            _, alive = psutil.wait_procs(workers, timeout=15)
            assert not alive, f"orphans: {[p.pid for p in alive]}"
            registry = json.loads((state_dir / "versions.json").read_text())
            active = registry["active"]
            assert Path(registry["versions"][active]["path"]).is_dir()
            # A restart without --path serves what the registry says, stale files and all.
            pool = start_pool(None, workers=1, state_dir=state_dir)
            with Client(pool.endpoint, timeout=30) as client:
                assert client.similarity([("今天天气真好", "今日阳光明媚")]).version == active
            target = "v1" if active == "v2" else "v2"
            rounds += 1
    finally:
        assert stop_pool(pool) == 0
