"""The supervisor: worker processes, their health, and converging to the wanted pool.

Modelled on gunicorn's arbiter: every tick reaps exited workers, kills hung ones, escalates
stops (STOP -> SIGTERM -> SIGKILL) and spawns or retires workers until each version runs
the number wanted of it. Callers (the server, the rotation) only change what is wanted.
Nothing here blocks.

A worker goes LOADING -> CHECKING (READY received, health probe sent) -> READY (routable);
then DRAINING (no new work, in-flight finishes) -> STOPPING (STOP sent) -> reaped.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

import psutil

from pool import config as c
from pool.health import Expectation, judge_probe, probe_body
from pool.startmethod import (
    choose_start_method,
    ensure_forkserver,
    stop_forkserver,
    worker_context,
)
from pool.worker import WorkerConfig, worker_main
from router import protocol as p
from router.broker import Broker

log = logging.getLogger("zeropool.supervisor")

LOADING, CHECKING, READY = "loading", "checking", "ready"
DRAINING, STOPPING = "draining", "stopping"
PROBE_TIMEOUT_S = 60.0


@dataclass
class VersionPlan:
    """What the pool should run for one version."""

    version: str
    path: str
    workers: int  # wanted
    expect: Expectation = field(default_factory=Expectation)
    crashes: deque[float] = field(default_factory=deque)
    restarts: int = 0
    backoff_until: float = 0.0
    ever_ready: bool = False
    failed: str | None = None  # why this version can never serve (broken: not retried)
    # Why a version that has served keeps crashing; retried every crash_retry_s until a
    # worker of it is ready again (a transient cause must not become a permanent outage).
    crash_loop: str | None = None
    retired: bool = False  # forget the plan once its last worker has exited
    # The last golden check (at load, then every GOLDEN_RECHECK_S on one ready worker).
    golden: dict | None = None
    golden_due: float = 0.0
    golden_pending: bool = False


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
    checking_since: float | None = None
    drain_since: float | None = None
    stop_at: float | None = None  # when STOP was sent
    term_at: float | None = None  # when SIGTERM was sent
    info: dict = field(default_factory=dict)
    restarts: int = 0
    checked_at: float = 0.0  # last golden re-check (monotonic)

    @property
    def live(self) -> bool:
        """Counts toward its version's wanted workers (not on its way out)."""
        return self.state in (LOADING, CHECKING, READY)


class Supervisor:
    def __init__(self, settings: c.PoolSettings, broker: Broker) -> None:
        self.settings = settings
        self.broker = broker
        self.plans: dict[str, VersionPlan] = {}
        self.procs: dict[str, WorkerProc] = {}
        self.events: deque[dict] = deque(maxlen=200)
        self.restarts_total: Counter[str] = Counter()  # by version, for the life of the pool
        self.start_method = choose_start_method(settings.start_method, settings.model)
        self._mp = worker_context(self.start_method, settings.threads)
        self._counter = 0

    # -- what is wanted ----------------------------------------------------------------------

    def want(self, version: str, path: str, workers: int,
             expect: Expectation | None = None) -> VersionPlan:
        """Run `workers` workers of `version` (spawned on the next tick)."""
        plan = self.plans.get(version)
        if plan is None or plan.path != path or plan.failed or plan.retired:
            plan = VersionPlan(version, path, workers, expect or Expectation())
            self.plans[version] = plan
        plan.workers = workers
        return plan

    def set_workers(self, version: str, workers: int) -> None:
        self.plans[version].workers = workers

    def retire_version(self, version: str) -> None:
        """Stop wanting a version: its workers drain, then stop; the plan goes once all exit."""
        plan = self.plans.get(version)
        if plan is not None:
            plan.workers = 0
            plan.retired = True

    def stop_all(self) -> None:
        for version in self.plans:
            self.retire_version(version)

    # -- events from the broker --------------------------------------------------------------

    def on_worker_ready(self, wid: bytes, info: dict) -> None:
        """A worker loaded its model: probe it through the backend before it takes traffic."""
        proc = self.procs.get(wid.decode())
        if proc is None or proc.state != LOADING:
            self.broker.stop_worker(wid)
            return
        proc.state, proc.info, proc.checking_since = CHECKING, info, time.monotonic()
        self._record("loaded", proc, load_seconds=info.get("load_seconds"))
        plan = self.plans[proc.version]
        self.broker.probe(wid, p.OP_SIMILARITY, probe_body(plan.expect),
                          lambda status, body: self._on_probe(proc, status, body))

    def _on_probe(self, proc: WorkerProc, status: bytes, body: bytes) -> None:
        if proc.state != CHECKING:
            return
        plan = self.plans.get(proc.version)
        if plan is None:
            return
        problem = self._judge(plan, proc, status, body)
        if problem is not None:
            self._record("health_check_failed", proc, reason=problem)
            log.error("worker %s failed its health check: %s", proc.wid, problem)
            self._note_crash(plan, f"health check failed: {problem}")
            self._begin_stop(proc)
            return
        proc.state = READY
        plan.ever_ready = True
        if plan.crash_loop is not None:
            log.warning("version %s serves again after its crash loop (%s)", plan.version,
                        plan.crash_loop)
            plan.crash_loop = None
        self.broker.enable_worker(proc.wid.encode())
        self._record("ready", proc, check_seconds=round(time.monotonic() -
                                                        (proc.checking_since or 0), 3))
        log.info("worker %s ready (version %s, pid %s, %s, %ss to load)", proc.wid,
                 proc.version, proc.pid, proc.info.get("device"), proc.info.get("load_seconds"))

    def _judge(self, plan: VersionPlan, proc: WorkerProc, status: bytes,
               body: bytes) -> str | None:
        """Why a probe reply disqualifies the worker (None: it passes); records the result."""
        if proc.info.get("dim") == 0:
            problem = None  # the echo model has no scores to judge
        else:
            problem = judge_probe(status, body, plan.expect, proc.info.get("dtype", ""))
        plan.golden = {"ok": problem is None, "reason": problem, "worker": proc.wid,
                       "at": time.time()}
        plan.golden_due = time.monotonic() + c.GOLDEN_RECHECK_S
        return problem

    def _recheck_golden(self, now: float) -> None:
        """Every GOLDEN_RECHECK_S, one ready worker per version answers the golden probe again.

        A failure is reported (health: failed), not acted on: the scores a version gives are
        the operator's call, and killing workers over them could take the pool down.
        """
        for plan in self.plans.values():
            if plan.golden_pending or now < plan.golden_due:
                continue
            ready = [w for w in self.procs.values() if w.version == plan.version
                     and w.state == READY]
            if not ready:
                continue
            proc = min(ready, key=lambda w: w.checked_at)
            proc.checked_at = now
            plan.golden_pending = True
            self.broker.probe(proc.wid.encode(), p.OP_SIMILARITY, probe_body(plan.expect),
                              lambda status, body, plan=plan, proc=proc:
                              self._on_recheck(plan, proc, status, body))

    def _on_recheck(self, plan: VersionPlan, proc: WorkerProc, status: bytes,
                    body: bytes) -> None:
        plan.golden_pending = False
        if status != p.STATUS_OK and (proc.wid not in self.procs or proc.state != READY):
            plan.golden_due = 0.0  # the worker went away meanwhile: ask another one
            return
        problem = self._judge(plan, proc, status, body)
        if problem is not None:
            log.error("golden re-check of %s on worker %s failed: %s", plan.version, proc.wid,
                      problem)

    # -- the tick ----------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        self._reap(now)
        self._murder_hung(now)
        self._manage_workers(now)
        self._finish_drains(now)
        self._escalate_stops(now)
        self._recheck_golden(now)

    def _reap(self, now: float) -> None:
        for proc in list(self.procs.values()):
            code = proc.process.exitcode  # non-blocking waitpid
            if code is None:
                continue
            del self.procs[proc.wid]
            proc.process.close()
            self.broker.forget_worker(proc.wid.encode(), f"worker exited with code {code}")
            planned = proc.stop_at is not None
            self._record("exited", proc, exit_code=code, planned=planned)
            if planned:
                log.info("worker %s exited (code %s)", proc.wid, code)
                continue
            log.warning("worker %s (pid %s) died unexpectedly: exit code %s", proc.wid,
                        proc.pid, code)
            plan = self.plans.get(proc.version)
            if plan is not None:
                when = {LOADING: "while loading", CHECKING: "during its health check"}.get(
                    proc.state, "while serving")
                self._note_crash(plan, f"worker exited with code {code} {when}")

    def _murder_hung(self, now: float) -> None:
        silent_limit = c.HEARTBEAT_S * c.HEARTBEAT_LIVENESS
        for proc in self.procs.values():
            if proc.stop_at is not None:
                continue
            if proc.state == LOADING and now - proc.started > c.LOAD_TIMEOUT_S:
                self._fail_worker(proc, f"did not load within {c.LOAD_TIMEOUT_S:.0f}s")
            elif proc.state == CHECKING and now - (proc.checking_since or now) > PROBE_TIMEOUT_S:
                self._fail_worker(proc, f"health probe unanswered for {PROBE_TIMEOUT_S:.0f}s")
            slot = self.broker.workers.get(proc.wid.encode())
            if proc.state == READY and slot is not None and now - slot.last_seen > silent_limit:
                log.error("worker %s silent for %.0fs (hung?); killing", proc.wid,
                          now - slot.last_seen)
                _signal(proc.pid, signal.SIGKILL)

    def _fail_worker(self, proc: WorkerProc, reason: str) -> None:
        log.error("worker %s %s; killing", proc.wid, reason)
        plan = self.plans.get(proc.version)
        if plan is not None:
            self._note_crash(plan, reason)
        proc.stop_at = proc.term_at = time.monotonic()
        proc.state = STOPPING
        _signal(proc.pid, signal.SIGKILL)

    def _manage_workers(self, now: float) -> None:
        """Spawn or retire workers until every version has the number wanted of it."""
        for version, plan in list(self.plans.items()):
            live = [w for w in self.procs.values() if w.version == version and w.live]
            wanted = 0 if plan.failed else plan.workers
            if len(live) < wanted and now >= plan.backoff_until:
                used = {w.slot for w in live}
                free = (s for s in range(wanted + len(live)) if s not in used)
                for _, slot in zip(range(wanted - len(live)), free, strict=False):
                    self._spawn(plan, slot)
            elif len(live) > wanted:
                # Workers not yet serving go first, then the least busy.
                order = {LOADING: 0, CHECKING: 1, READY: 2}
                live.sort(key=lambda w: (order[w.state], self._inflight(w)))
                for proc in live[: len(live) - wanted]:
                    self._drain(proc)
            if plan.retired and not self.has_workers(version):
                del self.plans[version]

    def _finish_drains(self, now: float) -> None:
        """A draining worker stops once idle, or after DRAIN_GRACE_S if it hangs."""
        for proc in self.procs.values():
            if proc.state != DRAINING:
                continue
            overdue = now - (proc.drain_since or now) > c.DRAIN_GRACE_S
            if overdue:
                log.warning("worker %s still holds %d requests after draining %.0fs; stopping",
                            proc.wid, self._inflight(proc), c.DRAIN_GRACE_S)
            if overdue or self._inflight(proc) == 0:
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
                log.warning("worker %s still alive after SIGTERM; SIGKILL", proc.wid)
                _signal(proc.pid, signal.SIGKILL)

    # -- verbs -------------------------------------------------------------------------------

    def _spawn(self, plan: VersionPlan, slot: int) -> WorkerProc:
        s = self.settings
        self._counter += 1
        wid = f"{plan.version}-{slot}-{self._counter}"
        device = s.devices[slot % len(s.devices)]
        cfg = WorkerConfig(
            worker_id=wid, version=plan.version, path=plan.path, device=device, dtype=s.dtype,
            threads=s.threads, max_batch=s.max_batch, max_wait_ms=s.max_wait_ms,
            capacity=s.capacity, backend=s.backend_endpoint, heartbeat_s=c.HEARTBEAT_S,
            model=s.model, max_pairs=s.max_pairs,
            max_text_chars=s.max_text_chars, log_json=s.log_json,
            load_niceness=s.load_niceness,
        )
        if self.start_method == "forkserver":
            ensure_forkserver(s.threads)
        process = self._mp.Process(target=worker_main, args=(cfg,), name=f"zeropool-{wid}")
        process.start()
        assert process.pid is not None  # set by start(); never 0, which would signal our group
        proc = WorkerProc(wid, plan.version, slot, device, process, process.pid,
                          time.monotonic(), restarts=plan.restarts)
        self.procs[wid] = proc
        self._record("spawned", proc)
        log.info("spawned worker %s (pid %s) for %s on %s", wid, process.pid, plan.version, device)
        return proc

    def _drain(self, proc: WorkerProc) -> None:
        if proc.state != READY:
            self._begin_stop(proc)  # nothing in flight yet: no need to wait
            return
        proc.state, proc.drain_since = DRAINING, time.monotonic()
        self.broker.drain_worker(proc.wid.encode())
        self._record("draining", proc)

    def _begin_stop(self, proc: WorkerProc) -> None:
        if proc.stop_at is not None:
            return
        loading = proc.state == LOADING
        proc.state, proc.stop_at = STOPPING, time.monotonic()
        self.broker.drain_worker(proc.wid.encode())
        self.broker.stop_worker(proc.wid.encode())
        if loading:
            # It reads its socket only once loaded; a load can take minutes. Stop it now.
            proc.term_at = proc.stop_at
            _signal(proc.pid, signal.SIGTERM)

    def _note_crash(self, plan: VersionPlan, reason: str) -> None:
        now = time.monotonic()
        plan.crashes.append(now)
        while plan.crashes and now - plan.crashes[0] > c.CRASH_LOOP_WINDOW_S:
            plan.crashes.popleft()
        plan.restarts += 1
        self.restarts_total[plan.version] += 1
        backoff = c.RESPAWN_BACKOFF_S[min(len(plan.crashes), len(c.RESPAWN_BACKOFF_S)) - 1]
        if not plan.ever_ready:
            # A version that never served once is broken, not unlucky: fail it now.
            plan.failed = reason
            log.error("version %s cannot serve: %s", plan.version, plan.failed)
        elif plan.crash_loop is not None or len(plan.crashes) >= c.CRASH_LOOP_LIMIT:
            backoff = self.settings.crash_retry_s
            plan.crash_loop = (f"crash loop: {plan.restarts} restarts, "
                               f"{len(plan.crashes)} in the last {c.CRASH_LOOP_WINDOW_S:.0f}s; "
                               f"last: {reason}; retried every {backoff:g}s")
            log.error("version %s: %s", plan.version, plan.crash_loop)
        plan.backoff_until = now + backoff

    def _record(self, event: str, proc: WorkerProc, **extra: object) -> None:
        self.events.append({"t": time.time(), "event": event, "worker": proc.wid,
                            "version": proc.version, "pid": proc.pid, **extra})

    def _inflight(self, proc: WorkerProc) -> int:
        slot = self.broker.workers.get(proc.wid.encode())
        return len(slot.inflight) if slot is not None else 0

    # -- queries -----------------------------------------------------------------------------

    def count(self, version: str, *states: str) -> int:
        return sum(1 for w in self.procs.values() if w.version == version and w.state in states)

    def has_workers(self, version: str) -> bool:
        return any(w.version == version for w in self.procs.values())

    def failure(self, version: str) -> str | None:
        """Why `version` cannot serve now: broken, or crash-looping with no worker ready."""
        plan = self.plans.get(version)
        if plan is None:
            return None
        if plan.crash_loop is not None and not self.count(version, READY):
            return plan.crash_loop
        return plan.failed

    def next_try_s(self, version: str) -> float | None:
        """Seconds until a crash-looping version gets its next worker (None: not waiting)."""
        plan = self.plans.get(version)
        if plan is None or plan.crash_loop is None:
            return None
        return round(max(0.0, plan.backoff_until - time.monotonic()), 1)

    @property
    def idle(self) -> bool:
        """Every worker process has been reaped."""
        return not self.procs

    def kill_everything(self) -> None:
        for proc in self.procs.values():
            _signal(proc.pid, signal.SIGKILL)
        for proc in self.procs.values():
            proc.process.join(timeout=5)
        stop_forkserver()

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
                "rss_bytes": _rss(proc.pid),
                "gpu_memory_bytes": proc.info.get("gpu_memory_bytes", 0),
                "batching": slot.reported if slot else {},
            })
        return rows

    def memory_per_worker(self, version: str) -> int:
        """Measured resident memory of one loaded worker of `version` (0 if none is loaded)."""
        sizes = [_rss(w.pid) for w in self.procs.values()
                 if w.version == version and w.state == READY]
        return max(sizes, default=0)


def _rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
