"""The supervisor: worker processes, their health, and converging to the wanted pool.

Modelled on gunicorn's arbiter: every tick reaps exited workers, kills hung ones, escalates
stops (STOP -> SIGTERM -> SIGKILL) and respawns what is missing, so the real pool converges
toward the wanted one. All of it runs on the serve loop; nothing here blocks.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

from pool import config as c
from pool.worker import WorkerConfig, worker_main
from router.broker import Broker

log = logging.getLogger("zeropool.supervisor")

SELF_SIMILARITY_MIN = 0.99

LOADING, READY, DRAINING, STOPPING, EXITED = "loading", "ready", "draining", "stopping", "exited"


@dataclass
class VersionPlan:
    """What the pool should run for one version."""

    version: str
    path: str
    workers: int
    expect: list[float] | None = None  # golden scores recorded in the registry
    crashes: deque[float] = field(default_factory=deque)
    ever_ready: bool = False
    failed: str | None = None  # why this version cannot serve, once it is known


@dataclass
class WorkerProc:
    wid: str
    version: str
    slot: int
    device: str
    process: BaseProcess
    pid: int
    started: float
    state: str = LOADING
    ready_at: float | None = None
    stop_at: float | None = None  # when STOP was sent
    term_at: float | None = None  # when SIGTERM was sent
    info: dict = field(default_factory=dict)
    restarts: int = 0


class Supervisor:
    def __init__(self, settings: c.PoolSettings, broker: Broker) -> None:
        self.settings = settings
        self.broker = broker
        self.plans: dict[str, VersionPlan] = {}
        self.procs: dict[str, WorkerProc] = {}
        self.respawn_due: dict[tuple[str, int], tuple[float, int]] = {}
        self.events: deque[dict] = deque(maxlen=200)
        self._mp = multiprocessing.get_context("spawn")
        self._counter = 0

    # -- wanted state ----------------------------------------------------------------------

    def add_version(self, version: str, path: str, workers: int,
                    expect: list[float] | None = None) -> VersionPlan:
        plan = VersionPlan(version, path, workers, expect)
        self.plans[version] = plan
        self.broker.open_lane(version)
        for slot in range(workers):
            self._spawn(plan, slot, restarts=0)
        return plan

    def retire_version(self, version: str) -> None:
        """Stop wanting a version: its workers drain, then stop."""
        self.plans.pop(version, None)
        for key in [k for k in self.respawn_due if k[0] == version]:
            del self.respawn_due[key]
        for proc in self.procs.values():
            if proc.version == version and proc.state in (LOADING, READY):
                self._drain(proc)

    def stop_all(self) -> None:
        for version in list(self.plans):
            self.retire_version(version)

    # -- events from the broker ------------------------------------------------------------

    def on_worker_ready(self, wid: bytes, info: dict) -> None:
        proc = self.procs.get(wid.decode())
        if proc is None or proc.state != LOADING:
            self.broker.stop_worker(wid)
            return
        plan = self.plans.get(proc.version)
        problem = health_problem(info, plan.expect if plan else None)
        if problem is not None:
            self._record("health_check_failed", proc, reason=problem)
            log.error("worker %s failed its health check: %s", proc.wid, problem)
            if plan is not None:
                self._note_crash(plan, f"health check failed: {problem}")
            self._begin_stop(proc)
            return
        proc.state, proc.ready_at, proc.info = READY, time.monotonic(), info
        self.broker.enable_worker(wid)
        if plan is not None:
            plan.ever_ready = True
        self._record("ready", proc, load_seconds=info.get("load_seconds"))
        log.info("worker %s ready (version %s, pid %s, %s, %ss to load)", proc.wid,
                 proc.version, proc.pid, info.get("device"), info.get("load_seconds"))

    # -- the tick --------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        self._reap(now)
        self._murder_hung(now)
        self._finish_drains()
        self._escalate_stops(now)
        self._respawn_due(now)

    def _reap(self, now: float) -> None:
        for proc in list(self.procs.values()):
            code = proc.process.exitcode  # non-blocking waitpid
            if code is None:
                continue
            del self.procs[proc.wid]
            proc.process.close()
            self.broker.forget_worker(proc.wid.encode(), f"exit code {code}")
            planned = proc.stop_at is not None
            self._record("exited", proc, exit_code=code, planned=planned)
            if planned:
                log.info("worker %s exited (code %s)", proc.wid, code)
                continue
            log.warning("worker %s (pid %s) died unexpectedly: exit code %s", proc.wid,
                        proc.pid, code)
            plan = self.plans.get(proc.version)
            if plan is not None:
                state = "while loading" if proc.state == LOADING else "while serving"
                self._note_crash(plan, f"worker exited with code {code} {state}")
                self._schedule_respawn(plan, proc, now)

    def _murder_hung(self, now: float) -> None:
        silent_for = c.HEARTBEAT_S * c.HEARTBEAT_LIVENESS
        for proc in self.procs.values():
            if proc.state == LOADING and now - proc.started > c.LOAD_TIMEOUT_S:
                log.error("worker %s did not load within %ss; killing", proc.wid,
                          c.LOAD_TIMEOUT_S)
                self._kill(proc)
            slot = self.broker.workers.get(proc.wid.encode())
            if proc.state == READY and slot is not None and now - slot.last_seen > silent_for:
                log.error("worker %s silent for %.0fs (hung?); killing", proc.wid,
                          now - slot.last_seen)
                self._kill(proc)

    def _finish_drains(self) -> None:
        for proc in self.procs.values():
            if proc.state != DRAINING:
                continue
            slot = self.broker.workers.get(proc.wid.encode())
            if slot is None or not slot.inflight:
                self._begin_stop(proc)

    def _escalate_stops(self, now: float) -> None:
        for proc in self.procs.values():
            if proc.stop_at is None:
                continue
            if proc.term_at is None and now - proc.stop_at > c.STOP_GRACE_S:
                log.warning("worker %s ignored STOP for %ss; SIGTERM", proc.wid, c.STOP_GRACE_S)
                proc.term_at = now
                _signal(proc.pid, signal.SIGTERM)
            elif proc.term_at is not None and now - proc.term_at > c.TERM_GRACE_S:
                log.warning("worker %s ignored SIGTERM; SIGKILL", proc.wid)
                _signal(proc.pid, signal.SIGKILL)

    def _respawn_due(self, now: float) -> None:
        for (version, slot), (due, restarts) in list(self.respawn_due.items()):
            if now < due:
                continue
            del self.respawn_due[(version, slot)]
            plan = self.plans.get(version)
            if plan is not None and plan.failed is None:
                self._spawn(plan, slot, restarts)

    # -- verbs -----------------------------------------------------------------------------

    def _spawn(self, plan: VersionPlan, slot: int, restarts: int) -> WorkerProc:
        s = self.settings
        self._counter += 1
        wid = f"{plan.version}-{slot}-{self._counter}"
        device = s.devices[slot % len(s.devices)]
        cfg = WorkerConfig(
            worker_id=wid, version=plan.version, path=plan.path, device=device, dtype=s.dtype,
            threads=s.threads, max_batch=s.max_batch, max_wait_ms=s.max_wait_ms,
            capacity=s.capacity, backend=s.backend_endpoint, heartbeat_s=c.HEARTBEAT_S,
            parent_pid=os.getpid(), model=s.model,
        )
        process = self._mp.Process(target=worker_main, args=(cfg,), name=f"zeropool-{wid}")
        process.start()
        assert process.pid is not None  # set by start(); never 0, which would signal our group
        proc = WorkerProc(wid, plan.version, slot, device, process, process.pid,
                          time.monotonic(), restarts=restarts)
        self.procs[wid] = proc
        self._record("spawned", proc)
        log.info("spawned worker %s (pid %s) for %s on %s", wid, process.pid, plan.version, device)
        return proc

    def _drain(self, proc: WorkerProc) -> None:
        if proc.state == LOADING:
            self._begin_stop(proc)
            return
        proc.state = DRAINING
        self.broker.drain_worker(proc.wid.encode())

    def _begin_stop(self, proc: WorkerProc) -> None:
        if proc.stop_at is not None:
            return
        proc.state, proc.stop_at = STOPPING, time.monotonic()
        self.broker.drain_worker(proc.wid.encode())
        self.broker.stop_worker(proc.wid.encode())
        if proc.info == {}:
            # Still loading, so it is not reading its socket yet: STOP would wait for the load.
            proc.term_at = proc.stop_at
            _signal(proc.pid, signal.SIGTERM)

    def _kill(self, proc: WorkerProc) -> None:
        _signal(proc.pid, signal.SIGKILL)

    def _schedule_respawn(self, plan: VersionPlan, proc: WorkerProc, now: float) -> None:
        if plan.failed is not None:
            return
        backoff = c.RESPAWN_BACKOFF_S[min(proc.restarts, len(c.RESPAWN_BACKOFF_S) - 1)]
        self.respawn_due[(plan.version, proc.slot)] = (now + backoff, proc.restarts + 1)

    def _note_crash(self, plan: VersionPlan, reason: str) -> None:
        now = time.monotonic()
        plan.crashes.append(now)
        while plan.crashes and now - plan.crashes[0] > c.CRASH_LOOP_WINDOW_S:
            plan.crashes.popleft()
        if not plan.ever_ready:
            # A version that never served once is broken, not unlucky: fail it now.
            plan.failed = reason
        elif len(plan.crashes) >= c.CRASH_LOOP_LIMIT:
            plan.failed = f"crash loop: {len(plan.crashes)} crashes in " \
                          f"{c.CRASH_LOOP_WINDOW_S:.0f}s, last: {reason}"
        if plan.failed is not None:
            log.error("version %s cannot serve: %s", plan.version, plan.failed)

    def _record(self, event: str, proc: WorkerProc, **extra: object) -> None:
        self.events.append({"t": time.time(), "event": event, "worker": proc.wid,
                            "version": proc.version, "pid": proc.pid, **extra})

    # -- queries ---------------------------------------------------------------------------

    def ready_workers(self, version: str) -> int:
        return sum(1 for p in self.procs.values() if p.version == version and p.state == READY)

    @property
    def idle(self) -> bool:
        """Every worker process has been reaped."""
        return not self.procs

    def kill_everything(self) -> None:
        for proc in self.procs.values():
            _signal(proc.pid, signal.SIGKILL)
        for proc in self.procs.values():
            proc.process.join(timeout=5)

    def worker_rows(self) -> list[dict]:
        rows = []
        now = time.monotonic()
        for proc in sorted(self.procs.values(), key=lambda x: (x.version, x.slot)):
            slot = self.broker.workers.get(proc.wid.encode())
            rows.append({
                "id": proc.wid, "pid": proc.pid, "version": proc.version,
                "device": proc.device, "state": proc.state, "restarts": proc.restarts,
                "inflight": len(slot.inflight) if slot else 0,
                "served": slot.served if slot else 0,
                "errors": slot.errors if slot else 0,
                "last_heartbeat_s": round(now - slot.last_seen, 2) if slot else None,
                "uptime_s": round(now - proc.started, 1),
                "load_seconds": proc.info.get("load_seconds"),
            })
        return rows


def health_problem(info: dict, expect: list[float] | None) -> str | None:
    """Why a freshly loaded worker must not take traffic, or None if it may."""
    golden = info.get("golden", [])
    selfsim = info.get("self_similarity", [])
    if info.get("dim") == 0:
        return None  # the echo model has nothing to check
    for x in golden:
        if not (x == x and -1.0001 <= x <= 1.0001):
            return f"golden score {x} is not a finite number in [-1, 1]"
    for x in selfsim:
        if not (x == x and x >= SELF_SIMILARITY_MIN):
            return f"a text scores {x} against itself (expected >= {SELF_SIMILARITY_MIN})"
    if expect:
        tolerance = 0.02 if info.get("dtype") in ("float16", "bfloat16") else 1e-3
        for got, want in zip(golden, expect, strict=False):
            if abs(got - want) > tolerance:
                return f"golden score {got:.4f} differs from expected {want:.4f}"
    return None


def _signal(pid: int | None, sig: int) -> None:
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
