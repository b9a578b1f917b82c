"""The supervisor: worker processes, their health, and converging to the wanted pool.

Modelled on gunicorn's arbiter: every tick reaps exited workers, kills hung ones, escalates
stops (STOP -> SIGTERM -> SIGKILL) and spawns or retires workers until each version runs
the number wanted of it. Callers (the server, the rotation, commands) only change what is
wanted. Nothing here blocks, and time is whatever `clock` says (a fake one in tests).

A worker goes LOADING -> CHECKING (READY received, health probe sent) -> READY (routable);
then DRAINING (no new work, in-flight finishes) -> STOPPING (STOP sent) -> reaped.

Each worker has one record, `Worker`: the broker routes to the same object (its routing
fields), so nothing is copied between a process table and a routing table. What happens on
the backend reaches the supervisor as broker events (`handle`). The lanes of the broker,
which versions take requests, change in one place: `sync_lanes`.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import psutil

from pool import config
from pool.health import Expectation, GoldenCheck, judge_probe, probe_body
from pool.processes import Launcher, Spawner, SpawnFailed, SpawnPending, WorkerProcess
from pool.reports import BatchStats, ReadyInfo
from pool.thresholds import SEED_VERSION_THRESHOLDS, VersionThresholds, resolve_thresholds
from pool.worker import WorkerConfig
from router import protocol
from router.broker import (
    Broker,
    BrokerEvent,
    HeartbeatReceived,
    LoadFailed,
    Pending,
    ProbeAnswered,
    WorkerAnnounced,
)

log = logging.getLogger("zeropool.supervisor")

LOADING, CHECKING, READY = "loading", "checking", "ready"
DRAINING, STOPPING = "draining", "stopping"
LIVE = (LOADING, CHECKING, READY)  # counts toward its version's wanted workers
LOAD_REASON_WAIT_S = 0.5  # how long a worker dead while loading waits for its W_FAILED
PROBE_TIMEOUT_S = 60.0
HEALTH_PROBE, GOLDEN_PROBE = "health", "golden"  # what a probe is for
REAP_TIMEOUT_S = 5.0


class Routing(str, Enum):
    """Whether a version's lane in the broker takes requests (see `sync_lanes`)."""

    HIDDEN = "hidden"  # no lane: a rotation's target before the switch
    OPEN = "open"  # requests queue for it, pinned or routed
    CLOSED = "closed"  # new requests pinned to it are refused; queued ones still run


@dataclass
class VersionPlan:
    """What the pool should run for one version."""

    version: str
    path: str
    workers: int  # wanted
    expect: Expectation = field(default_factory=Expectation)
    routing: Routing = Routing.OPEN
    # The verdict thresholds its workers answer with, fixed for the plan's life: workers of
    # one version never disagree on a verdict (new ones apply when the version next loads).
    thresholds: VersionThresholds = SEED_VERSION_THRESHOLDS
    crashes: deque[float] = field(default_factory=deque)
    restarts: int = 0
    last_crash: str | None = None  # why its latest worker crashed
    backoff_until: float = 0.0
    ever_ready: bool = False
    failed: str | None = None  # why this version can never serve (broken: not retried)
    # Why a version that has served keeps crashing; retried every crash_retry_s until a
    # worker of it is ready again (a transient cause must not become a permanent outage).
    crash_loop: str | None = None
    retired: bool = False  # forget the plan once its last worker has exited
    # The last golden check (at load, then every GOLDEN_RECHECK_S on one ready worker).
    golden: GoldenCheck | None = None
    golden_due: float = 0.0
    golden_probe: bytes | None = None  # the worker re-answering the golden probe now


@dataclass(slots=True, eq=False)
class Worker:
    """One worker process: the supervisor's record of it and the broker's (one record)."""

    id: bytes  # its DEALER identity; `name` is the same id as text
    version: str
    slot: int
    device: str
    process: WorkerProcess
    started: float
    capacity: int
    restarts: int = 0
    state: str = LOADING
    info: ReadyInfo | None = None  # from READY
    checking_since: float | None = None
    drain_since: float | None = None
    stop_at: float | None = None  # when STOP was sent
    term_at: float | None = None  # when SIGTERM was sent
    checked_at: float = 0.0  # last golden re-check
    batching: BatchStats | None = None  # from its latest heartbeat
    load_error: str | None = None  # why its model did not load (W_FAILED), one line
    exit_seen: float | None = None  # when its exit was first seen, its reason not yet in
    # Routing: read and written by the broker (router.broker.RoutedWorker).
    inflight: dict[int, Pending] = field(default_factory=dict)
    served: int = 0
    errors: int = 0
    last_seen: float = 0.0
    unreachable: bool = False

    @property
    def name(self) -> str:
        return self.id.decode()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def live(self) -> bool:
        """Counts toward its version's wanted workers (not on its way out)."""
        return self.state in LIVE

    @property
    def routable(self) -> bool:
        return self.state == READY and not self.unreachable


@dataclass(frozen=True, slots=True)
class WorkerView:
    """One worker as `pool status`, health and metrics see it."""

    id: str
    pid: int
    version: str
    device: str
    dtype: str | None  # what its weights run in, from READY; None until then
    graph: str | None  # how its forward passes run (traced / eager), from READY
    pooling: str | None  # how its sentence vectors are pooled (mean / cls / ...), from READY
    prompt: str | None  # its model's default prompt's name, from READY ("": none)
    state: str
    restarts: int
    inflight: int
    served: int
    errors: int
    last_heartbeat_s: float | None  # None until it announced itself
    uptime_s: float
    load_seconds: float | None
    rss_bytes: int
    gpu_memory_bytes: int
    batching: BatchStats | None
    passes_cores: tuple[int, ...] | None = None  # --cpu-affinity: its forward passes' cores


@dataclass(frozen=True, slots=True)
class VersionView:
    """One version's plan and workers, as status and health see it."""

    version: str
    path: str
    workers_wanted: int
    workers_ready: int
    failed: str | None  # why it cannot serve now (broken, or crash-looping with none ready)
    crash_loop: str | None
    next_try_s: float | None
    restarts: int
    retired: bool
    ever_ready: bool
    crash_times: tuple[float, ...]  # the clock at each crash in the crash-loop window
    golden: GoldenCheck | None
    thresholds: VersionThresholds


@dataclass(frozen=True, slots=True)
class SupervisorSnapshot:
    start_method: str
    versions: dict[str, VersionView]
    workers: list[WorkerView]
    events: list[dict]
    restarts_total: dict[str, int]


class Supervisor:
    def __init__(self, settings: config.PoolSettings, broker: Broker, *,
                 spawn: Spawner | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.broker = broker
        self.clock = clock
        self.plans: dict[str, VersionPlan] = {}
        self.workers: dict[bytes, Worker] = {}
        self.events: deque[dict] = deque(maxlen=200)
        self.restarts_total: Counter[str] = Counter()  # by version, for the life of the pool
        self.start_method = config.choose_start_method(settings.start_method, settings.model)
        self._launcher = Launcher(self.start_method, settings.threads) if spawn is None else None
        self._spawner: Spawner = spawn or self._launcher  # type: ignore[assignment]
        self._counter = 0
        self.stopping = False  # the pool is stopping: no worker is started any more

    # -- what is wanted ----------------------------------------------------------------------

    def want(self, version: str, path: str, workers: int, expect: Expectation | None = None,
             routing: Routing = Routing.OPEN,
             thresholds: VersionThresholds | None = None) -> VersionPlan:
        """Run `workers` workers of `version` (spawned on the next tick). `thresholds`: what
        its verdicts use (default: its built-in model's, else the seed's); a plan kept keeps
        its own."""
        plan = self.plans.get(version)
        if plan is None or plan.path != path or plan.failed or plan.retired:
            plan = VersionPlan(version, path, workers, expect or Expectation(), routing,
                               thresholds=thresholds or resolve_thresholds(None, path))
            self.plans[version] = plan
        plan.workers = workers
        self.sync_lanes()
        return plan

    def wanted(self, version: str) -> int:
        """How many workers of `version` the pool wants (0: none, or not a version of it)."""
        plan = self.plans.get(version)
        return 0 if plan is None else plan.workers

    def set_workers(self, version: str, workers: int) -> None:
        self.plans[version].workers = workers

    def set_routing(self, version: str, routing: Routing) -> None:
        self.plans[version].routing = routing
        self.sync_lanes()

    def retire_version(self, version: str) -> None:
        """Stop wanting a version: its workers drain, then stop; the plan goes once all exit.
        Its lane goes now: what is still queued for it fails as unknown_version."""
        plan = self.plans.get(version)
        if plan is not None:
            plan.workers = 0
            plan.retired = True
        self.sync_lanes()

    def begin_shutdown(self) -> None:
        """The pool is stopping: workers that exit are not replaced (a process group
        signalled as a whole has its workers finish and exit on their own meanwhile)."""
        self.stopping = True

    def can_serve(self) -> bool:
        """Some worker is serving, or will be: not everything has stopped or is stopping."""
        return any(w.live for w in self.workers.values())

    def stop_all(self) -> None:
        for version in list(self.plans):
            self.retire_version(version)

    def sync_lanes(self) -> None:
        """The one place the broker's lanes change: they follow the plans.

        A lane exists for each plan that is neither retired nor hidden, and for the active
        version whatever its plan (it goes only when another version is active); it is open
        or closed as its plan's routing says, and failed while the version cannot serve.
        """
        broker = self.broker
        wanted = {name: plan.routing for name, plan in self.plans.items()
                  if not plan.retired and plan.routing is not Routing.HIDDEN}
        for name in list(broker.lanes):
            if name not in wanted and name != broker.active:
                broker.remove_lane(name)
        for name, routing in wanted.items():
            if routing is Routing.OPEN:
                broker.open_lane(name)
            else:
                broker.close_lane(name)
        for name in self.plans:
            broker.set_lane_failure(name, self.failure(name))

    # -- events from the broker --------------------------------------------------------------

    def handle(self, event: BrokerEvent) -> None:
        if isinstance(event, LoadFailed):
            worker = self.workers.get(event.worker)
            if worker is not None:
                worker.load_error = event.reason
        elif isinstance(event, HeartbeatReceived):
            worker = self.workers.get(event.worker)
            if worker is not None:
                worker.batching = BatchStats.decode(event.body)
        elif isinstance(event, WorkerAnnounced):
            self._on_announced(event)
        elif event.purpose == HEALTH_PROBE:
            self._on_health_probe(event)
        else:
            self._on_golden_probe(event)

    def _on_announced(self, event: WorkerAnnounced) -> None:
        """A worker loaded its model: probe it through the backend before it takes traffic."""
        worker = self.workers.get(event.worker)
        if worker is None or worker.state != LOADING:
            self.broker.stop_worker(event.worker)
            return
        worker.state, worker.checking_since = CHECKING, self.clock()
        worker.info = ReadyInfo.decode(event.info)
        self._record("loaded", worker, load_seconds=worker.info.load_seconds)
        plan = self.plans[worker.version]
        self.broker.probe(worker.id, HEALTH_PROBE, protocol.OP_SIMILARITY,
                          probe_body(plan.expect))

    def _on_health_probe(self, event: ProbeAnswered) -> None:
        worker = self.workers.get(event.worker)
        if worker is None or worker.state != CHECKING:
            return
        plan = self.plans.get(worker.version)
        if plan is None:
            return
        problem = self._judge(plan, worker, event)
        if problem is not None:
            self._record("health_check_failed", worker, reason=problem)
            log.error("worker %s failed its health check: %s", worker.name, problem)
            self._note_crash(plan, f"health check failed: {problem}")
            self._begin_stop(worker)
            return
        worker.state = READY
        plan.ever_ready = True
        if plan.crash_loop is not None:
            log.warning("version %s serves again after its crash loop (%s)", plan.version,
                        plan.crash_loop)
            plan.crash_loop = None
            # Its lane fails requests fast until told otherwise: told now, not at the next
            # tick, or a request arriving meanwhile is refused by a version that serves.
            self.sync_lanes()
        self._record("ready", worker, check_seconds=round(
            self.clock() - (worker.checking_since or 0), 3))
        info = worker.info
        log.info("worker %s ready (version %s, pid %s, %s, %ss to load)", worker.name,
                 worker.version, worker.pid, info.device if info else worker.device,
                 info.load_seconds if info else None)

    def _judge(self, plan: VersionPlan, worker: Worker, event: ProbeAnswered) -> str | None:
        """Why a probe reply disqualifies the worker (None: it passes); records the result."""
        info = worker.info
        if info is not None and info.dim == 0:
            problem = None  # the echo model has no scores to judge
        else:
            problem = judge_probe(event.status, event.body, plan.expect,
                                  info.dtype if info else "")
        plan.golden = GoldenCheck(problem is None, problem, worker.name, time.time())
        plan.golden_due = self.clock() + config.GOLDEN_RECHECK_S
        return problem

    def _recheck_golden(self, now: float) -> None:
        """Every GOLDEN_RECHECK_S, one ready worker per version answers the golden probe again.

        A failure is reported (health: failed), not acted on: the scores a version gives are
        the operator's call, and killing workers over them could take the pool down.
        """
        for plan in self.plans.values():
            if plan.golden_probe is not None or now < plan.golden_due:
                continue
            worker = self.any_ready(plan.version)
            if worker is None:
                continue
            worker.checked_at = now
            plan.golden_probe = worker.id
            self.broker.probe(worker.id, GOLDEN_PROBE, protocol.OP_SIMILARITY,
                              probe_body(plan.expect))

    def _on_golden_probe(self, event: ProbeAnswered) -> None:
        plan = next((x for x in self.plans.values() if x.golden_probe == event.worker), None)
        if plan is None:
            return
        plan.golden_probe = None
        worker = self.workers.get(event.worker)
        if worker is None or worker.state != READY:
            plan.golden_due = 0.0  # the worker went away meanwhile: ask another one
            return
        problem = self._judge(plan, worker, event)
        if problem is not None:
            log.error("golden re-check of %s on worker %s failed: %s", plan.version,
                      worker.name, problem)

    # -- the tick ----------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        self._reap(now)
        self._murder_hung(now)
        self._manage_workers(now)
        self._finish_drains(now)
        self._escalate_stops(now)
        self._recheck_golden(now)
        self.sync_lanes()

    def _reap(self, now: float) -> None:
        # Workers of one version that die in the same tick died of one cause (a killed
        # forkserver takes every worker): one crash, not one per worker, or a pool of five
        # would be a crash loop at once and fail requests for a minute.
        crashed: dict[str, list[str]] = {}
        for worker in list(self.workers.values()):
            code = worker.process.exitcode
            if code is None or self._reason_on_its_way(worker, code, now):
                continue
            del self.workers[worker.id]
            worker.process.reap(0)
            self.broker.forget_worker(worker.id, f"worker exited with code {code}")
            planned = worker.stop_at is not None
            self._record("exited", worker, exit_code=code, planned=planned)
            if planned:
                log.info("worker %s exited (code %s)", worker.name, code)
                continue
            if code == 0:
                # Told to stop by someone else (SIGTERM): not a crash. Replaced unless the
                # pool is stopping too.
                log.warning("worker %s (pid %s) stopped on its own (SIGTERM?)%s", worker.name,
                            worker.pid, "" if self.stopping else "; starting another")
                continue
            log.warning("worker %s (pid %s) died unexpectedly: exit code %s", worker.name,
                        worker.pid, code)
            when = {LOADING: "while loading", CHECKING: "during its health check"}.get(
                worker.state, "while serving")
            why = f": {worker.load_error}" if worker.load_error else ""
            crashed.setdefault(worker.version, []).append(
                f"worker exited with code {code} {when}{why}")
        for version, reasons in crashed.items():
            plan = self.plans.get(version)
            if plan is not None:
                others = f" (and {len(reasons) - 1} more at once)" if len(reasons) > 1 else ""
                self._note_crash(plan, reasons[0] + others)

    def _reason_on_its_way(self, worker: Worker, code: int, now: float) -> bool:
        """A worker that failed to load sends why (W_FAILED) before it exits, but its exit
        can be seen before the message is read: its reaping waits a moment for it."""
        if worker.state != LOADING or code == 0 or worker.load_error is not None \
                or worker.stop_at is not None:
            return False
        if worker.exit_seen is None:
            worker.exit_seen = now
        return now - worker.exit_seen < LOAD_REASON_WAIT_S

    def _murder_hung(self, now: float) -> None:
        silent_limit = config.HEARTBEAT_S * config.HEARTBEAT_LIVENESS
        for worker in self.workers.values():
            if worker.stop_at is not None:
                continue
            if worker.state == LOADING and now - worker.started > config.LOAD_TIMEOUT_S:
                self._fail_worker(worker, f"did not load within {config.LOAD_TIMEOUT_S:.0f}s")
            elif worker.state == CHECKING and \
                    now - (worker.checking_since or now) > PROBE_TIMEOUT_S:
                self._fail_worker(worker,
                                  f"health probe unanswered for {PROBE_TIMEOUT_S:.0f}s")
            elif worker.state == READY and now - worker.last_seen > silent_limit:
                log.error("worker %s silent for %.0fs (hung?); killing", worker.name,
                          now - worker.last_seen)
                worker.process.signal(signal.SIGKILL)

    def _fail_worker(self, worker: Worker, reason: str) -> None:
        log.error("worker %s %s; killing", worker.name, reason)
        plan = self.plans.get(worker.version)
        if plan is not None:
            self._note_crash(plan, reason)
        worker.stop_at = worker.term_at = self.clock()
        worker.state = STOPPING
        worker.process.signal(signal.SIGKILL)

    def _manage_workers(self, now: float) -> None:
        """Spawn or retire workers until every version has the number wanted of it."""
        for version, plan in list(self.plans.items()):
            live = [w for w in self.workers.values() if w.version == version and w.live]
            wanted = 0 if plan.failed else plan.workers
            if len(live) < wanted and now >= plan.backoff_until and not self.stopping:
                used = {w.slot for w in live}
                free = (s for s in range(wanted + len(live)) if s not in used)
                for _, slot in zip(range(wanted - len(live)), free, strict=False):
                    if not self._spawn(plan, slot):
                        return
            elif len(live) > wanted:
                # Workers not yet serving go first, then the least busy.
                order = {LOADING: 0, CHECKING: 1, READY: 2}
                live.sort(key=lambda w: (order[w.state], len(w.inflight)))
                for worker in live[: len(live) - wanted]:
                    self._drain(worker)
            if plan.retired and not self.has_workers(version):
                del self.plans[version]

    def _finish_drains(self, now: float) -> None:
        """A draining worker stops once idle, or after DRAIN_GRACE_S if it hangs."""
        for worker in self.workers.values():
            if worker.state != DRAINING:
                continue
            overdue = now - (worker.drain_since or now) > config.DRAIN_GRACE_S
            if overdue:
                log.warning("worker %s still holds %d requests after draining %.0fs; stopping",
                            worker.name, len(worker.inflight), config.DRAIN_GRACE_S)
            if overdue or not worker.inflight:
                self._begin_stop(worker)

    def _escalate_stops(self, now: float) -> None:
        for worker in self.workers.values():
            if worker.stop_at is None:
                continue
            if worker.term_at is None and now - worker.stop_at > config.STOP_GRACE_S:
                log.warning("worker %s ignored STOP for %ss; SIGTERM", worker.name,
                            config.STOP_GRACE_S)
                worker.term_at = now
                worker.process.signal(signal.SIGTERM)
            elif worker.term_at is not None and now - worker.term_at > config.TERM_GRACE_S:
                log.warning("worker %s still alive after SIGTERM; SIGKILL", worker.name)
                worker.process.signal(signal.SIGKILL)

    # -- verbs -------------------------------------------------------------------------------

    def _spawn(self, plan: VersionPlan, slot: int) -> Worker | None:
        """The worker started, or None when no process can start now (tried next tick)."""
        s = self.settings
        name = f"{plan.version}-{slot}-{self._counter + 1}"
        device = s.devices[slot % len(s.devices)]
        try:
            process = self._spawner(WorkerConfig(name, plan.version, plan.path, device, s,
                                                 thresholds=plan.thresholds.thresholds,
                                                 slot=slot))
        except SpawnPending:
            return None
        except SpawnFailed as exc:
            self._note_crash(plan, f"no worker process could start: {exc}")
            return None
        self._counter += 1
        worker = Worker(name.encode(), plan.version, slot, device, process, self.clock(),
                        s.capacity, restarts=plan.restarts)
        self.workers[worker.id] = worker
        self.broker.add_worker(worker)
        self._record("spawned", worker)
        log.info("spawned worker %s (pid %s) for %s on %s", name, worker.pid, plan.version,
                 device)
        return worker

    def _drain(self, worker: Worker) -> None:
        if worker.state != READY:
            self._begin_stop(worker)  # nothing in flight yet: no need to wait
            return
        worker.state, worker.drain_since = DRAINING, self.clock()
        self._record("draining", worker)

    def _begin_stop(self, worker: Worker) -> None:
        if worker.stop_at is not None:
            return
        loading = worker.state == LOADING
        worker.state, worker.stop_at = STOPPING, self.clock()
        self.broker.stop_worker(worker.id)
        if loading:
            # It reads its socket only once loaded; a load can take minutes. Stop it now.
            worker.term_at = worker.stop_at
            worker.process.signal(signal.SIGTERM)

    def _note_crash(self, plan: VersionPlan, reason: str) -> None:
        now = self.clock()
        plan.crashes.append(now)
        while plan.crashes and now - plan.crashes[0] > config.CRASH_LOOP_WINDOW_S:
            plan.crashes.popleft()
        plan.restarts += 1
        plan.last_crash = reason
        self.restarts_total[plan.version] += 1
        backoff = config.RESPAWN_BACKOFF_S[
            min(len(plan.crashes), len(config.RESPAWN_BACKOFF_S)) - 1]
        if not plan.ever_ready:
            # A version that never served once is broken, not unlucky: fail it now.
            plan.failed = reason
            log.error("version %s cannot serve: %s", plan.version, plan.failed)
        elif plan.crash_loop is not None or len(plan.crashes) >= config.CRASH_LOOP_LIMIT:
            backoff = self.settings.crash_retry_s
            plan.crash_loop = (f"crash loop: {plan.restarts} restarts, "
                               f"{len(plan.crashes)} in the last "
                               f"{config.CRASH_LOOP_WINDOW_S:.0f}s; "
                               f"last: {reason}; retried every {backoff:g}s")
            log.error("version %s: %s", plan.version, plan.crash_loop)
        plan.backoff_until = now + backoff

    def _record(self, event: str, worker: Worker, **extra: object) -> None:
        self.events.append({"t": time.time(), "event": event, "worker": worker.name,
                            "version": worker.version, "pid": worker.pid, **extra})

    # -- queries -----------------------------------------------------------------------------

    def count(self, version: str, *states: str) -> int:
        return sum(1 for w in self.workers.values() if w.version == version and w.state in states)

    def any_ready(self, version: str) -> Worker | None:
        """One ready worker of `version` (the one checked longest ago), if any."""
        ready = [w for w in self.workers.values() if w.version == version and w.state == READY]
        return min(ready, key=lambda w: w.checked_at, default=None)

    def dimension(self, version: str) -> int | None:
        """The embedding size a version's ready workers said they answer (None: unknown;
        0: no embeddings, the echo model)."""
        worker = self.any_ready(version)
        return None if worker is None or worker.info is None else worker.info.dim

    def has_workers(self, version: str) -> bool:
        return any(w.version == version for w in self.workers.values())

    def failure(self, version: str) -> str | None:
        """Why `version` cannot serve now: broken, or crash-looping with no worker ready."""
        plan = self.plans.get(version)
        if plan is None:
            return None
        if plan.crash_loop is not None and not self.count(version, READY):
            return plan.crash_loop
        return plan.failed

    def restarts(self, version: str) -> int:
        plan = self.plans.get(version)
        return 0 if plan is None else plan.restarts

    def crash_since(self, version: str, restarts: int) -> str | None:
        """Why a worker of `version` crashed, if one has since the version had `restarts`
        restarts (a rotation counts its new version's crashes from its own start)."""
        plan = self.plans.get(version)
        if plan is None or plan.restarts <= restarts:
            return None
        return plan.last_crash

    def next_try_s(self, version: str) -> float | None:
        """Seconds until a crash-looping version gets its next worker (None: not waiting)."""
        plan = self.plans.get(version)
        if plan is None or plan.crash_loop is None:
            return None
        return round(max(0.0, plan.backoff_until - self.clock()), 1)

    @property
    def idle(self) -> bool:
        """Every worker process has been reaped."""
        return not self.workers

    def kill_everything(self) -> None:
        for worker in self.workers.values():
            worker.process.signal(signal.SIGKILL)
        for worker in self.workers.values():
            worker.process.reap(REAP_TIMEOUT_S)
        if self._launcher is not None:
            self._launcher.close()

    def worker_views(self) -> list[WorkerView]:
        now = self.clock()
        return [self._view(w, now) for w in
                sorted(self.workers.values(), key=lambda x: (x.version, x.slot))]

    def _view(self, worker: Worker, now: float) -> WorkerView:
        info = worker.info
        return WorkerView(
            id=worker.name, pid=worker.pid, version=worker.version, device=worker.device,
            dtype=info.dtype if info else None, graph=info.graph if info else None,
            pooling=info.pooling if info else None, prompt=info.prompt if info else None,
            state=worker.state, restarts=worker.restarts,
            inflight=len(worker.inflight),
            served=worker.served, errors=worker.errors,
            last_heartbeat_s=round(now - worker.last_seen, 2) if info else None,
            uptime_s=round(now - worker.started, 1),
            load_seconds=info.load_seconds if info else None, rss_bytes=_rss(worker.pid),
            gpu_memory_bytes=info.gpu_memory_bytes if info else 0, batching=worker.batching,
            passes_cores=self.settings.passes_cores_of(worker.slot))

    def version_views(self) -> dict[str, VersionView]:
        return {name: VersionView(
            version=name, path=plan.path, workers_wanted=plan.workers,
            workers_ready=self.count(name, READY), failed=self.failure(name),
            crash_loop=plan.crash_loop, next_try_s=self.next_try_s(name),
            restarts=plan.restarts, retired=plan.retired, ever_ready=plan.ever_ready,
            crash_times=tuple(plan.crashes), golden=plan.golden, thresholds=plan.thresholds)
            for name, plan in self.plans.items()}

    def snapshot(self) -> SupervisorSnapshot:
        return SupervisorSnapshot(self.start_method, self.version_views(), self.worker_views(),
                                  list(self.events), dict(self.restarts_total))

    def memory_per_worker(self, version: str) -> int:
        """Measured resident memory of one loaded worker of `version` (0 if none is loaded)."""
        sizes = [_rss(w.pid) for w in self.workers.values()
                 if w.version == version and w.state == READY]
        return max(sizes, default=0)


def _rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0
