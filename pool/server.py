"""`pool serve`: one process, one event loop holding the router, the supervisor and control.

The loop polls the backend (replies free credit), the frontend (new requests), the control
socket and a self-pipe for signals, hands the broker's events to the supervisor, then
dispatches queued work; every TICK_S it lets the supervisor converge the pool and the
rotation take its next step. Signals only queue an event (gunicorn's arbiter pattern).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import zmq

from pool import config
from pool.commands import Commands
from pool.control import PID_FILE, ControlError, ControlServer, RemoteControl, serving_pid
from pool.cpus import core_list_text, pin_process, usable_cpus
from pool.gate import QualityGate, read_eval_set
from pool.health import Expectation
from pool.metrics import REFRESH_S, PoolMetrics
from pool.registry import Registry
from pool.rotation import RotationController, hand_over
from pool.startmethod import ForkserverError
from pool.status import PoolSnapshot
from pool.supervisor import Supervisor
from pool.system import system_stats
from pool.thresholds import VersionThresholds, resolve_thresholds
from pool.worker import freeze_heap
from router import protocol
from router.auth import CurveServer, KeyFileError, is_loopback
from router.broker import Broker

log = logging.getLogger("zeropool.server")


class StartupError(RuntimeError):
    """The pool cannot start: the message says why."""


class VersionFailed(RuntimeError):
    """The version the pool started with never served (its load or health check failed): the
    pool stopped, and the message says why."""


class PoolServer:
    def __init__(self, settings: config.PoolSettings) -> None:
        self.settings = settings
        # First: the threads started from here on (ZeroMQ's, the forkserver, the workers it
        # forks) inherit it; each worker moves its device thread to its slot's cores.
        if settings.cpu_affinity is not None:
            pin_serving_path(settings.cpu_affinity.serving)
        self.state_dir = prepare_state_dir(settings.state_dir)
        self.registry = Registry(self.state_dir)
        self.ctx = zmq.Context()
        self.curve: CurveServer | None = None
        self.remote_control: RemoteControl | None = None
        self.curve = self._start_curve()
        # Before the broker and the workers: a refused --control-bind leaves little to undo.
        self.remote_control = self._start_remote_control()
        try:
            self.broker = Broker(
                self.ctx, settings.bind, settings.backend_endpoint,
                max_queue=settings.max_queue, queue_timeout_s=settings.queue_timeout_s,
                max_message_bytes=settings.max_message_bytes, curve=self.curve,
            )
        except zmq.ZMQError as exc:
            self._abandon_start()
            raise StartupError(f"cannot listen on {settings.bind}: {exc}") from None
        self.metrics = PoolMetrics()
        self.metrics_url = self._serve_metrics()
        self.broker.observer = self.metrics.replies.add
        try:
            self.supervisor = Supervisor(settings, self.broker)
        except ForkserverError as exc:
            self.metrics.close()
            self.broker.close()
            self._abandon_start()
            raise StartupError(str(exc)) from None
        self.rotations = RotationController(self.supervisor, self.broker, self.registry,
                                            recent=self.metrics.recent)
        self.rotations.on_finish = self.metrics.on_rotation_finished
        self.system = system_stats(self.settings.pool_cores)
        handlers = Commands(self, self.rotations, self.registry).handlers()
        self.control = ControlServer.local(self.ctx, self.state_dir, handlers)
        if self.remote_control is not None:
            self.remote_control.handlers = handlers  # the same commands, operators elsewhere
        self.started = time.time()
        self.stopping_since: float | None = None
        self._stop_reported = False  # the pending requests of a stop are logged once
        self.exit_code = 0
        self.failure: str | None = None  # why the version it started with never served
        self._signals: list[int] = []

    def _start_curve(self) -> CurveServer | None:
        s = self.settings
        if s.curve_secret_key is None:
            if not is_loopback(s.bind):
                log.warning("!!! %s is reachable from other machines and Curve is off: anyone "
                            "who can reach it can send requests. Use --curve-secret-key and "
                            "--curve-allow (see `pool keygen`). !!!", s.bind)
            return None
        try:
            return CurveServer(self.ctx, s.curve_secret_key, s.curve_allow)
        except KeyFileError as exc:
            self._abandon_start()
            raise StartupError(str(exc)) from None

    def _start_remote_control(self) -> RemoteControl | None:
        s = self.settings
        if not s.control_bind:
            return None
        key = s.control_secret_key or s.curve_secret_key
        if key is None or s.operator_keys is None:  # pool.settings checked; a caller may not
            self._abandon_start()
            raise StartupError("--control-bind needs a Curve server key and --operator-keys")
        try:
            remote = RemoteControl(s.control_bind, key, s.operator_keys)
        except (KeyFileError, ControlError) as exc:
            self._abandon_start()
            raise StartupError(str(exc)) from None
        log.info("remote control on %s: CurveZMQ, operator keys from %s", s.control_bind,
                 s.operator_keys)
        return remote

    def _serve_metrics(self) -> str | None:
        s = self.settings
        if s.metrics_port is None:
            return None
        try:
            port = self.metrics.serve_http(s.metrics_host, s.metrics_port)
        except OSError as exc:
            self.broker.close()
            self._abandon_start()
            raise StartupError(f"cannot serve metrics on {s.metrics_host}:{s.metrics_port}: "
                               f"{exc}") from None
        url = f"http://{s.metrics_host}:{port}/metrics"
        log.info("Prometheus metrics on %s", url)
        return url

    def _abandon_start(self) -> None:
        if self.curve is not None:
            self.curve.close()
        if self.remote_control is not None:
            self.remote_control.close()
        self.ctx.destroy(linger=0)
        (self.state_dir / PID_FILE).unlink(missing_ok=True)

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._queue_signal)
        try:
            self._start_active_version()
            freeze_heap()  # the loop every producer shares must not stall on a full collection
            self._loop(wake_r)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            self.supervisor.kill_everything()
            self.registry.close_interrupted_rotations("the pool stopped during it")
            self.registry.save()
            self.metrics.close()
            self.control.close()
            if self.remote_control is not None:
                self.remote_control.close()
            self.broker.close()
            if self.curve is not None:
                self.curve.close()
            self.ctx.term()
            wake_r.close()
            wake_w.close()
            for name in ("control.sock", "backend.sock", PID_FILE):
                (self.state_dir / name).unlink(missing_ok=True)
            if self.settings.bind.startswith("ipc://"):
                Path(self.settings.bind[len("ipc://"):]).unlink(missing_ok=True)
        if self.failure is not None:
            raise VersionFailed(self.failure)
        return self.exit_code

    def _start_active_version(self) -> None:
        """Serve the configured version, plus the registry's auto-load versions (pinned)."""
        s = self.settings
        # `pool serve --thresholds` gives the version served thresholds of its own.
        self.registry.put_version(s.version, s.path, auto_load=True, thresholds=s.thresholds)
        self.registry.set_active(s.version)
        cut_off = self.registry.close_interrupted_rotations(
            "the pool exited during it without stopping (killed?)")
        if cut_off:
            log.warning("rotation(s) %s were cut off when this state directory's last pool "
                        "died; recorded as interrupted", ", ".join(map(str, cut_off)))
        self.registry.log("serve", version=s.version, path=s.path, workers=s.workers)
        self.registry.save()
        self.load_version(s.version, s.path)
        self.broker.set_active(s.version)
        log.info("listening on %s (control %s), %d worker(s) of %s loading from %s",
                 self.broker.frontend_endpoint, s.control_endpoint, s.workers, s.version, s.path)
        log_cpus(s)
        for entry in self.registry.listing():
            if entry["auto_load"] and entry["version"] != s.version:
                log.info("auto-loading %s from %s", entry["version"], entry["path"])
                self.load_version(entry["version"], entry["path"])

    # -- what commands may ask (pool.commands.PoolHandle) ------------------------------------

    @property
    def stopping(self) -> bool:
        return self.stopping_since is not None

    @property
    def active_version(self) -> str | None:
        return self.broker.active

    @property
    def default_workers(self) -> int:
        return self.settings.workers

    def loaded(self, version: str) -> bool:
        return version in self.supervisor.plans

    def load_version(self, version: str, path: str, workers: int | None = None) -> None:
        """Workers of `version` start; requests for it queue while they load."""
        entry = self.registry.version(version) or {}
        self.supervisor.want(version, path, workers or self.settings.workers,
                             Expectation.from_dict(entry.get("expect")),
                             thresholds=self._thresholds_of(version, path))

    def _thresholds_of(self, version: str, path: str) -> VersionThresholds:
        try:
            return self.registry.thresholds_of(version, path)
        except ValueError as exc:  # only a registry file edited by hand gets here
            log.error("version %s: %s; its verdicts use the default thresholds", version, exc)
            return resolve_thresholds(None, path)

    def unload_version(self, version: str) -> None:
        self.supervisor.retire_version(version)

    def quality_gate(self, version: str) -> QualityGate | None:
        entry = self.registry.version(version) or {}
        spec = entry.get("eval") or self.settings.eval_pairs
        if not spec:
            return None
        return QualityGate(spec, read_eval_set(spec), self.settings.min_spearman,
                           self.settings.max_spearman_drop, self.settings.max_pairs)

    def thresholds_in_use(self, version: str) -> VersionThresholds | None:
        plan = self.supervisor.plans.get(version)
        return None if plan is None or plan.retired else plan.thresholds

    def snapshot(self) -> PoolSnapshot:
        return PoolSnapshot(
            pid=os.getpid(), uptime_s=round(time.time() - self.started, 1),
            stopping=self.stopping, now=time.monotonic(),
            previous=self.registry.data["previous"],
            requests_per_s=round(self.metrics.recent.per_second(), 1),
            latency_ms=self.metrics.recent.latency_ms(),
            replies_by_code={name: self.metrics.recent.by_code(name)
                             for name in self.supervisor.plans},
            metrics_url=self.metrics_url, log_file=str(self.state_dir / config.LOG_FILE),
            system=self.system, settings=config.shown_settings(self.settings),
            broker=self.broker.snapshot(), supervisor=self.supervisor.snapshot(),
            rotation=self.rotations.status(),
            curve=None if self.curve is None else self.curve.refusals.as_dict(),
            remote_control=None if self.remote_control is None
            else self.remote_control.status())

    def _loop(self, wake_r: socket.socket) -> None:
        poller = zmq.Poller()
        poller.register(self.broker.backend, zmq.POLLIN)
        poller.register(self.broker.frontend, zmq.POLLIN)
        poller.register(self.control.sock, zmq.POLLIN)
        poller.register(wake_r, zmq.POLLIN)
        curve, remote = self.curve, self.remote_control
        if curve is not None:
            poller.register(curve.zap_socket, zmq.POLLIN)
        if remote is not None:
            poller.register(remote.sock, zmq.POLLIN)
            poller.register(remote.curve.zap_socket, zmq.POLLIN)
        backend, frontend, control = self.broker.backend, self.broker.frontend, self.control.sock
        tick_ms = int(config.TICK_S * 1000)
        next_tick = next_refresh = 0.0
        while True:
            events = dict(poller.poll(tick_ms))
            if backend in events:
                self.broker.handle_backend()
            if frontend in events:
                self.broker.handle_frontend()
            if control in events:
                self.control.handle()
            if curve is not None and curve.zap_socket in events:
                curve.handle_zap()
            if remote is not None:
                if remote.curve.zap_socket in events:
                    remote.curve.handle_zap()
                if remote.sock in events:
                    remote.handle()
            if wake_r.fileno() in events:
                _drain_pipe(wake_r)
                self._handle_signals()
            # What the broker saw (READY, probe replies, heartbeats; also probes its last
            # tick's reaping or a failed send answered) goes to the supervisor, or to the
            # rotation for its quality gate.
            hand_over(self.broker.take_events(), self.supervisor, self.rotations)
            self.broker.dispatch()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + config.TICK_S
                self.supervisor.tick(now)
                if self.stopping_since is None:
                    self.rotations.step(now)
                self.broker.expire_queued(now)
                self._check_active_failed()
                if self.stopping_since is not None and self._shutdown_step(now):
                    return
            if now >= next_refresh:
                next_refresh = now + REFRESH_S
                self.system = system_stats(self.settings.pool_cores)
                self.metrics.refresh(self.broker.snapshot(), self.supervisor.snapshot(),
                                     None if curve is None else curve.refusals.count,
                                     self.system,
                                     None if remote is None else remote.curve.refusals.count)
                if curve is not None:
                    curve.reload_if_changed()
                if remote is not None:
                    remote.curve.reload_if_changed()

    def _queue_signal(self, signum: int, _frame: Any) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            log.info("received %s", signal.Signals(signum).name)
            self.begin_shutdown()

    def begin_shutdown(self) -> None:
        if self.stopping_since is None:
            log.info("stopping: new requests get shutting_down, in-flight work finishes")
            self.stopping_since = time.monotonic()
            self.broker.accepting = False
            self.supervisor.begin_shutdown()

    def _shutdown_step(self, now: float) -> bool:
        """Drain, then stop workers; True once every worker is reaped."""
        busy = self.broker.inflight + self.broker.queued
        drain_s = self.settings.shutdown_drain_s
        stranded = busy and not self.supervisor.can_serve()
        if self.supervisor.plans and (busy == 0 or stranded
                                      or now - self.stopping_since > drain_s):
            if busy and not self._stop_reported:
                # Past the drain, or every worker gone already (they were signalled with us)
                # with nothing to start in their place: waiting would change nothing.
                log.warning("%d requests still pending %s; stopping anyway", busy,
                            "with no worker left" if stranded else f"after {drain_s:.0f}s")
                self._stop_reported = True
            self.broker.fail_all_queued(protocol.SHUTTING_DOWN, "pool stopped before it could run")
            self.supervisor.stop_all()
        if not self.supervisor.plans and self.supervisor.idle:
            # What the last workers held when they were killed went back to a queue: nothing
            # is left to run it, and every accepted request gets its one reply.
            self.broker.fail_all_queued(protocol.SHUTTING_DOWN, "pool stopped before it could run")
            log.info("all workers stopped; bye")
            return True
        return False

    def _check_active_failed(self) -> None:
        """At start-up, a failed active version ends the pool."""
        active = self.supervisor.plans.get(self.broker.active or "")
        if active is None or active.ever_ready or not active.failed:
            return
        if self.stopping_since is None:
            log.error("active version %s failed: %s; shutting down", active.version, active.failed)
            self.exit_code = 1
            self.failure = f"version {active.version} cannot serve: {active.failed}"
            self.begin_shutdown()
            self.broker.fail_all_queued(protocol.WORKER_FAILED,
                                        f"version failed: {active.failed}")


def log_cpus(settings: config.PoolSettings) -> None:
    """The CPUs the pool sized itself by (pool.cpus), and where its threads run."""
    log.info("CPUs: %s; %d torch thread(s) per worker",
             usable_cpus(cores=settings.pool_cores).describe(), settings.threads)
    if settings.cpu_affinity is not None:
        log.info("CPU affinity: %s", settings.cpu_affinity.describe())


def pin_serving_path(cores: tuple[int, ...]) -> None:
    try:
        pin_process(cores)
    except OSError as exc:  # the cores were checked at start: a cpuset changed since
        raise StartupError(f"--cpu-affinity: cannot run on cores {core_list_text(cores)}: "
                           f"{exc.strerror or exc}") from None


def prepare_state_dir(state_dir: Path) -> Path:
    """Create the state directory 0700, refuse a second live pool, clear stale sockets."""
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    owner = state_dir.stat().st_uid
    if owner != os.geteuid():
        raise StartupError(f"{state_dir} belongs to uid {owner}, not to this user: its control "
                           "socket would not be private; use a directory of your own")
    os.chmod(state_dir, 0o700)
    other = serving_pid(state_dir)
    if other is not None and other != os.getpid():
        raise StartupError(f"a pool (pid {other}) is already serving from {state_dir}; "
                           "stop it with `pool stop` or use another --state-dir")
    for name in ("control.sock", "backend.sock"):
        (state_dir / name).unlink(missing_ok=True)
    (state_dir / PID_FILE).write_text(f"{os.getpid()}\n")
    return state_dir


def _drain_pipe(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        pass


def serve(settings: config.PoolSettings) -> int:
    settings.state_dir = Path(settings.state_dir).resolve()
    return PoolServer(settings).run()
