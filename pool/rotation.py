"""The rotation state machine: replacing the serving version without failing a request.

    idle -> spawning -> loading -> health_check -> switching -> [baking ->] draining -> done
                 \\          \\            \\                     |
                  +----------+------------+---------------------+--> rolling_back -> failed

With a canary, `switching` routes a share of unpinned traffic to the new version and the
rotation waits in `canary` until `promote` (-> switching -> draining -> done) or
`rollback` (-> rolling_back -> failed).

With a bake (`--bake SECONDS`), the old version's workers stay loaded after the switch while
pool.judge compares the new version's replies with the old version's before the switch; a
regression, or `rollback`, switches back at once (-> rolling_back -> failed, outcome
rolled_back), and a clean bake goes on to draining.

Strategies:
  surge    new workers start beside the old ones (blue-green); the switch is one step.
  rolling  the device cannot hold both: one old worker is retired before each new one
           starts; routing switches as soon as the first new worker passes its check.
  auto     surge if measured free memory holds a second set of workers, else rolling.

With a quality gate (pool.gate), `health_check` also scores a labelled set through one new
worker and one of the active version, and rolls back when the new version scores too low.

`RotationController.step` runs on every supervisor tick; each transition is logged with the
time spent in the phase it leaves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Protocol

import psutil

from pool import config
from pool.control import BAD_COMMAND, REFUSED
from pool.gate import ACTIVE_CHUNK_PAIRS, GateResult, GateRun, QualityGate
from pool.health import Expectation
from pool.judge import BakeLimits, Traffic, Verdict, judge
from pool.registry import Registry
from pool.supervisor import CHECKING, DRAINING, LIVE, READY, STOPPING, Routing, Supervisor
from pool.system import gpu_stats
from pool.thresholds import VersionThresholds
from router import protocol
from router.broker import Broker, BrokerEvent, ProbeAnswered

log = logging.getLogger("zeropool.rotation")

DEFAULT_DRAIN_TIMEOUT_S = 30.0
QUALITY_PROBE = "quality"  # the purpose of the gate's probes (router.broker.ProbeAnswered)
# A gate probe unanswered this long ends the gate (a thousand pairs through a 12-layer model
# on a busy CPU, with room); a set of many probes may take longer as a whole.
QUALITY_TIMEOUT_S = 120.0
NEW, ACTIVE = "new", "active"  # whose answer a gate probe brings
MEMORY_HEADROOM = 1.2  # surge only if free memory exceeds 1.2x a second set of workers
BAKE_BASELINE_S = 60.0  # a bake compares with the old version's last minute before the switch
# A bake's p99 leaves out its first seconds (at most a quarter of the bake): a new worker's
# first passes of each new shape can pay plan selection (on a GPU, 960 ms once in attention
# right after a start: docs/benchmarks.md, session 5), a start-up cost every version pays, not
# a regression. Its errors count from the switch on.
BAKE_SETTLE_S = 2.0


class Phase(str, Enum):
    IDLE = "idle"
    SPAWNING = "spawning"
    LOADING = "loading"
    HEALTH_CHECK = "health_check"
    SWITCHING = "switching"
    CANARY = "canary"
    BAKING = "baking"
    DRAINING = "draining"
    DONE = "done"
    ROLLING_BACK = "rolling_back"
    FAILED = "failed"


TERMINAL = (Phase.DONE, Phase.FAILED)
BEFORE_SWITCH = (Phase.SPAWNING, Phase.LOADING, Phase.HEALTH_CHECK)


class RecentTraffic(Protocol):
    """The pool's replies, recorded once a second (pool.metrics.RecentReplies)."""

    def traffic(self, version: str, since: float, strict: bool = False) -> Traffic:
        """A version's replies since `since` (the controller's clock): from the last record
        at or before it, or with `strict`, from the first at or after it."""

    def record(self, now: float) -> None:
        """A record now, so that a span can start at this moment exactly."""


class RotationError(ValueError):
    """A rotation cannot start or be changed: the message says why, `code` how (pool.control:
    the request's arguments, or the pool's state)."""

    def __init__(self, message: str, code: str = REFUSED) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Rotation:
    id: int
    target: str
    path: str
    source: str | None
    workers: int
    strategy: str  # surge | rolling (auto is resolved before the rotation starts)
    drain_timeout_s: float
    canary: float | None = None
    strategy_reason: str = ""
    phase: Phase = Phase.IDLE
    started_at: float = field(default_factory=time.time)
    phase_since: float = 0.0  # the controller's clock
    timings: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    switched: bool = False
    source_closed_at: float | None = None  # drain: source stopped taking pinned requests
    source_retired: bool = False
    allow_dim_change: bool = False  # the operator knows its embeddings change dimension
    gate: QualityGate | None = None
    quality: GateResult | None = None  # the gate's verdict, once judged
    gate_sent_at: float | None = None
    gate_runs: dict[str, GateRun] = field(default_factory=dict)  # NEW / ACTIVE -> its scoring
    # The active version's Spearman on the set, from the gate it passed itself (no ACTIVE run)
    gate_active_known: float | None = None
    bake_s: float | None = None  # keep the old version loaded this long after the switch
    bake_limits: BakeLimits = field(default_factory=BakeLimits)
    bake_baseline: Traffic | None = None  # the old version's replies before the switch
    bake_verdict: Verdict | None = None  # the latest judgement of the bake
    switched_back: bool = False  # the bake (or the operator during it) returned to source
    target_restarts: int = 0  # the new version's restarts when the rotation started
    source_workers: int = 0  # the old version's workers when it started: what a rollback restores
    registry_previous: str | None = None  # the registry's previous version before the switch

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL

    @property
    def outcome(self) -> str | None:
        if self.phase == Phase.DONE:
            return "done"
        if self.phase == Phase.FAILED:
            # Ending a canary is a rollback too: the old version kept all unpinned traffic.
            rolled_back = not self.switched or self.canary or self.switched_back
            return "rolled_back" if rolled_back else "failed"
        return None

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id, "target": self.target, "source": self.source, "path": self.path,
            "strategy": self.strategy, "strategy_reason": self.strategy_reason,
            "workers": self.workers, "canary": self.canary,
            "phase": self.phase.value, "outcome": self.outcome, "reason": self.reason,
            "started_at": self.started_at, "phase_elapsed_s": round(now - self.phase_since, 3),
            "timings": self.timings, "total_s": round(sum(self.timings.values()), 3)
            if self.finished else None,
            "quality": None if self.quality is None else self.quality.as_dict(),
            "bake": self._bake_dict(),
        }

    def _bake_dict(self) -> dict[str, Any] | None:
        if self.bake_s is None:
            return None
        return {"seconds": self.bake_s, "max_error_rate": self.bake_limits.max_error_rate,
                "max_p99_ratio": self.bake_limits.max_p99_ratio,
                "verdict": None if self.bake_verdict is None else self.bake_verdict.as_dict()}


def unscored_why(run: GateRun | None) -> str | None:
    """Why a version has no scores for the whole gate set (None: it has them)."""
    if run is None:
        return "none of its workers was ready"
    if run.failure is not None:
        return run.failure
    if not run.done:
        return f"a probe unanswered in {QUALITY_TIMEOUT_S:.0f}s"
    return None


class RotationController:
    def __init__(self, supervisor: Supervisor, broker: Broker, registry: Registry, *,
                 recent: RecentTraffic, clock: Callable[[], float] = time.monotonic) -> None:
        self.supervisor = supervisor
        self.broker = broker
        self.registry = registry
        self.clock = clock
        self.recent = recent  # the replies a bake judges
        self.current: Rotation | None = None
        self.on_finish: Callable[[Rotation], None] | None = None  # metrics
        self._ids = registry.last_rotation_id()  # ids go on across the pool's restarts
        # What each tick does in each phase. SWITCHING has no step (the switch is made on
        # entry, at once); CANARY waits for `promote` or `rollback`.
        self._steps: dict[Phase, Callable[[Rotation, float], None]] = {
            Phase.SPAWNING: self._step_spawning,
            Phase.LOADING: self._step_loading,
            Phase.HEALTH_CHECK: self._step_health_check,
            Phase.BAKING: self._step_baking,
            Phase.DRAINING: self._step_draining,
            Phase.ROLLING_BACK: self._step_rolling_back,
        }

    # -- operator verbs ----------------------------------------------------------------------

    def start(self, target: str, path: str, *, workers: int, strategy: str = "auto",
              drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S, canary: float | None = None,
              expect: Expectation | None = None,
              thresholds: VersionThresholds | None = None,
              gate: QualityGate | None = None, allow_dim_change: bool = False,
              bake_s: float | None = None, bake_limits: BakeLimits | None = None) -> Rotation:
        if self.current is not None and not self.current.finished:
            raise RotationError(f"rotation {self.current.id} to {self.current.target} is still "
                                f"{self.current.phase.value}; wait for it or roll it back")
        source = self.broker.active
        if target == source:
            raise RotationError(f"{target} is already the active version")
        plan = self.supervisor.plans.get(target)
        loaded = plan is not None and plan.path == path and not plan.retired and not plan.failed
        if self.supervisor.has_workers(target) and not loaded:
            raise RotationError(f"{target} still has workers from another path; wait or unload")
        if canary is not None and not 0 < canary < 100:
            raise RotationError(f"--canary {canary:g}: a percentage above 0 and under 100 (the "
                                "share of unpinned traffic the new version takes)", BAD_COMMAND)
        if strategy not in ("surge", "rolling", "auto"):
            raise RotationError(f"unknown strategy {strategy!r}: surge, rolling or auto",
                                BAD_COMMAND)
        strategy_reason = f"{strategy} requested"
        if loaded:
            # Already serving pinned traffic (`pool load`, auto-load): it only needs the
            # switch, the seed's switch_version. No second set of memory is needed.
            strategy, strategy_reason = "surge", f"{target} is already loaded"
        elif strategy == "auto":
            strategy, strategy_reason = self._choose_strategy(source, workers)
        if canary is not None and strategy == "rolling":
            raise RotationError("a canary runs both versions side by side: use --strategy surge",
                                BAD_COMMAND)
        if bake_s is not None and bake_s <= 0:
            raise RotationError("--bake is a number of seconds above 0", BAD_COMMAND)
        if bake_s is not None and strategy == "rolling":
            raise RotationError(f"a bake keeps the old version loaded beside the new one, and "
                                f"this rotation would be rolling ({strategy_reason}): use "
                                "--strategy surge where the device holds both")
        self._ids += 1
        rot = Rotation(self._ids, target, path, source, workers, strategy, drain_timeout_s,
                       canary / 100 if canary is not None else None,
                       strategy_reason=strategy_reason, phase_since=self.clock(), gate=gate,
                       allow_dim_change=allow_dim_change, bake_s=bake_s,
                       bake_limits=bake_limits or BakeLimits())
        rot.target_restarts = self.supervisor.restarts(target)
        rot.source_workers = self.supervisor.wanted(source) if source else 0
        self.current = rot
        self.registry.log("rotation_started", rotation=rot.id, target=target, source=source,
                          strategy=strategy, canary=rot.canary,
                          eval=None if gate is None else gate.source, bake_s=bake_s)
        self.registry.save()
        log.info("rotation %d: %s -> %s (%s, workers %d%s)", rot.id, source, target, strategy,
                 workers, f", canary {canary}%" if canary is not None else "")
        self._enter(rot, Phase.SPAWNING)
        if not loaded:
            # The steps below add workers; its lane opens at the switch.
            self.supervisor.want(target, path, 0, expect, routing=Routing.HIDDEN,
                                 thresholds=thresholds)
        return rot

    def promote(self) -> Rotation:
        rot = self.current
        if rot is None or rot.phase != Phase.CANARY:
            raise RotationError("no canary is running")
        rot.canary = None
        self._enter(rot, Phase.SWITCHING)
        self._switch(rot)
        return rot

    def rollback(self, reason: str = "rolled back by operator") -> Rotation | None:
        """End a rotation that has not switched, a canary or a bake; None if nothing to roll
        back."""
        rot = self.current
        if rot is None or rot.finished:
            return None
        if rot.phase == Phase.ROLLING_BACK:
            return rot  # already on its way back
        if rot.phase == Phase.BAKING:
            self._switch_back(rot, reason)
            return rot
        if rot.switched and rot.phase != Phase.CANARY:
            raise RotationError(f"rotation {rot.id} already switched to {rot.target}; "
                                "roll back with a new rotation (`pool rollback` does this)")
        self._begin_rollback(rot, reason)
        return rot

    # -- the machine -------------------------------------------------------------------------

    def step(self, now: float) -> None:
        rot = self.current
        if rot is None or rot.finished:
            return
        failure = self._target_failure(rot)
        if failure is not None and rot.phase != Phase.ROLLING_BACK:
            self._give_up(rot, failure)
            if rot.finished:
                return
        handler = self._steps.get(rot.phase)
        if handler is not None:
            handler(rot, now)

    def _target_failure(self, rot: Rotation) -> str | None:
        """Why the new version cannot go on: broken, or crash-looping with no worker ready;
        and, until each of its workers has passed its check, any crash of one since the
        rotation started (a new version that crashes while it comes up is not trusted
        with traffic, and would otherwise be retried for ever)."""
        failure = self.supervisor.failure(rot.target)
        if failure is None and not self._target_complete(rot):
            failure = self.supervisor.crash_since(rot.target, rot.target_restarts)
        return failure

    def _target_complete(self, rot: Rotation) -> bool:
        """Every new worker has passed its check once: surge switches only then; rolling
        closes the old version only then."""
        if rot.phase in BEFORE_SWITCH:
            return False
        return rot.strategy != "rolling" or rot.source is None or \
            rot.source_closed_at is not None

    def _give_up(self, rot: Rotation, failure: str) -> None:
        """The new version failed: back to the old one where its workers still serve."""
        if rot.phase in BEFORE_SWITCH:
            self._begin_rollback(rot, failure)
            return
        reason = f"{rot.target} failed after the switch: {failure}"
        if rot.phase == Phase.CANARY:
            self._begin_rollback(rot, reason)
        elif self._source_serves(rot):
            self._switch_back(rot, reason)
        else:
            # Nothing of the old version is left to take the traffic back: the pool stays
            # on the new version, as serving as it can be, and says why.
            rot.reason = reason
            log.error("rotation %d: %s", rot.id, rot.reason)
            self._finish(rot, Phase.FAILED)

    def _source_serves(self, rot: Rotation) -> bool:
        return rot.source is not None and not rot.source_retired and \
            self.supervisor.count(rot.source, READY) > 0

    def _step_spawning(self, rot: Rotation, now: float) -> None:
        if rot.strategy == "rolling" and rot.source is not None:
            self._rolling_step(rot)  # one old worker makes room before the first new one
            if self.supervisor.count(rot.target, *LIVE) == 0:
                return
        else:
            self.supervisor.set_workers(rot.target, rot.workers)
        self._enter(rot, Phase.LOADING)

    def _step_loading(self, rot: Rotation, now: float) -> None:
        # All first-round workers have loaded their model (and are being probed).
        if self.supervisor.count(rot.target, CHECKING, READY) >= self._first_round(rot):
            self._enter(rot, Phase.HEALTH_CHECK)

    def _step_health_check(self, rot: Rotation, now: float) -> None:
        if self.supervisor.count(rot.target, READY) < self._first_round(rot):
            return
        changed = self._dimension_change(rot)
        if changed is not None and not rot.allow_dim_change:
            self._begin_rollback(rot, changed)
            return
        if rot.gate is not None and rot.quality is None:
            rot.quality = self._run_gate(rot, rot.gate, now)
            if rot.quality is None:
                return  # its answers are on their way
            self._record_gate(rot, rot.quality)
            if not rot.quality.passed:
                self._begin_rollback(rot, rot.quality.reason or "quality gate failed")
                return
        self._enter(rot, Phase.SWITCHING)
        self._switch(rot)

    def _dimension_change(self, rot: Rotation) -> str | None:
        """Why the new version's embeddings do not fit where the active version's went."""
        new = self.supervisor.dimension(rot.target)
        old = self.supervisor.dimension(rot.source) if rot.source else None
        if not new or not old or new == old:
            return None
        return (f"{rot.target} answers {new}-dimensional embeddings where {rot.source} "
                f"answers {old}-dimensional ones: a consumer mixing the two (an index of "
                "stored embeddings) would be wrong; --allow-dim-change rotates anyway")

    # -- the quality gate --------------------------------------------------------------------

    def handle(self, event: BrokerEvent) -> None:
        """An answer to one of the gate's probes (the serve loop hands over those only)."""
        rot = self.current
        if rot is None or not isinstance(event, ProbeAnswered):
            return
        run = next((run for run in rot.gate_runs.values()
                    if run.worker == event.worker and not run.done), None)
        if run is None:
            return
        run.take_answer(event.status, event.body)
        if not run.done and rot.phase == Phase.HEALTH_CHECK and rot.quality is None:
            self._send_gate_probe(run)

    def _run_gate(self, rot: Rotation, gate: QualityGate, now: float) -> GateResult | None:
        """The gate's verdict once its probes are answered or one is overdue; None meanwhile."""
        if rot.gate_sent_at is None:
            self._start_gate_runs(rot, gate)
            rot.gate_sent_at = now
            return None
        new, active = rot.gate_runs.get(NEW), rot.gate_runs.get(ACTIVE)
        new_failed = new is not None and new.failure is not None  # the verdict, whatever else
        runs = rot.gate_runs.values()
        if not new_failed and any(not run.done and now - run.progressed_at < QUALITY_TIMEOUT_S
                                  for run in runs):
            return None
        why = unscored_why(new)
        if new is None or why is not None:
            return gate.unscored(f"the new version could not score {gate.source}: {why}")
        why = unscored_why(active) if active is not None else None
        if why is not None:
            log.warning("rotation %d: the active version could not score %s (%s); the gate "
                        "judges by the floor alone", rot.id, gate.source, why)
        scored = active is not None and why is None
        return gate.judge(new.scores, active.scores if scored else None, rot.gate_active_known)

    def _start_gate_runs(self, rot: Rotation, gate: QualityGate) -> None:
        """One new worker scores the set in probes as large as the pool takes (it serves no
        traffic yet); one of the active version's, serving, a few pairs at a time, unless
        that version scored the same set from the same model when it passed its own gate."""
        rot.gate_active_known = self._scored_before(rot.source, gate) if rot.source else None
        scorers = [(NEW, rot.target, gate.max_request_pairs)]
        if rot.gate_active_known is None:
            scorers.append((ACTIVE, rot.source, ACTIVE_CHUNK_PAIRS))
        else:
            log.info("rotation %d: %s scored %s on %s when it was rotated to: not scored "
                     "again", rot.id, rot.source, rot.gate_active_known, gate.source)
        for role, version, chunk in scorers:
            worker = self.supervisor.any_ready(version) if version else None
            if worker is not None:
                run = GateRun(worker.id, gate.probes(chunk), self.clock())
                rot.gate_runs[role] = run
                self._send_gate_probe(run)

    def _scored_before(self, version: str, gate: QualityGate) -> float | None:
        """`version`'s Spearman on this very set, from the registry's history of gates,
        where it was measured on the model the version runs now."""
        plan = self.supervisor.plans.get(version)
        if plan is None:
            return None
        measured = {"event": "quality_gate", "target": version, "set_digest": gate.digest,
                    "path": plan.path}
        for event in reversed(self.registry.data["history"]):
            if all(event.get(key) == value for key, value in measured.items()):
                return event.get("spearman")
        return None

    def _send_gate_probe(self, run: GateRun) -> None:
        run.progressed_at = self.clock()
        self.broker.probe(run.worker, QUALITY_PROBE, protocol.OP_SIMILARITY, run.next_probe())

    def _record_gate(self, rot: Rotation, result: GateResult) -> None:
        log.info("rotation %d: quality gate %s: Spearman %s (active %s) on %s", rot.id,
                 "passed" if result.passed else "failed", result.spearman,
                 result.active_spearman, result.source)
        self.registry.log("quality_gate", rotation=rot.id, target=rot.target, path=rot.path,
                          set_digest=rot.gate.digest if rot.gate else None, **result.as_dict())
        self.registry.save()

    # -- the bake ----------------------------------------------------------------------------

    def _step_baking(self, rot: Rotation, now: float) -> None:
        """Judge the new version's replies since the switch against the old version's before
        it; switch back at the first regression, go on to draining once the bake is over."""
        assert rot.bake_baseline is not None and rot.bake_s is not None
        since = now - rot.phase_since
        verdict = judge(rot.bake_baseline, self._baked_traffic(rot), rot.bake_limits,
                        (rot.target, rot.source or "the old version"))
        rot.bake_verdict = verdict
        if verdict.regressed:
            self._switch_back(rot, f"bake: {verdict.reason}")
        elif since >= rot.bake_s:
            log.info("rotation %d: %s baked %.0fs: %d requests, %d errors, p99 %s ms", rot.id,
                     rot.target, since, verdict.candidate.requests, verdict.candidate.errors,
                     verdict.candidate.p99_ms)
            self.registry.log("baked", rotation=rot.id, target=rot.target, **verdict.as_dict())
            self.registry.save()
            self._enter(rot, Phase.DRAINING)

    def _baked_traffic(self, rot: Rotation) -> Traffic:
        """The new version's replies since the switch, its latencies over those after the
        settle (none of those before it: strict)."""
        assert rot.bake_s is not None
        switched = rot.phase_since
        replies = self.recent.traffic(rot.target, switched)
        settle = min(BAKE_SETTLE_S, rot.bake_s / 4)
        settled = self.recent.traffic(rot.target, switched + settle, strict=True)
        return replace(replies, p99_ms=settled.p99_ms, p90_ms=settled.p90_ms,
                       latency_over=settled.latency_over or 0)

    def _switch_back(self, rot: Rotation, reason: str) -> None:
        """The old version's workers are still loaded: routing goes back to them at once."""
        assert rot.source is not None
        self.supervisor.set_routing(rot.source, Routing.OPEN)  # a drain may have closed it
        self.broker.set_active(rot.source)
        self.supervisor.set_routing(rot.target, Routing.CLOSED)
        self._record_active(rot.source, rot.target)
        self.registry.switch_back(rot.source, rot.registry_previous)
        rot.switched_back = True
        self.registry.log("switched_back", rotation=rot.id, target=rot.target,
                          source=rot.source, reason=reason)
        self.registry.save()
        self._begin_rollback(rot, reason)

    def _step_draining(self, rot: Rotation, now: float) -> None:
        if rot.strategy == "rolling" and rot.source is not None and not self._rolling_step(rot):
            return
        source = rot.source
        if source is None:
            self._finish(rot, Phase.DONE)
            return
        if rot.source_closed_at is None:
            # Requests pinned to the old version are served until it is idle or time is up.
            if self._source_idle(source, now) or now - rot.phase_since > rot.drain_timeout_s:
                self.supervisor.set_routing(source, Routing.CLOSED)
                rot.source_closed_at = now
            return
        if not rot.source_retired:
            # What is queued still needs the old workers; what is in flight drains with them.
            queued = self.broker.queue_length(source)
            if queued == 0 or now - rot.source_closed_at > config.STOP_GRACE_S:
                self.supervisor.retire_version(source)
                rot.source_retired = True
            return
        if not self.supervisor.has_workers(source):
            self._finish(rot, Phase.DONE)

    def _source_idle(self, source: str, now: float) -> bool:
        return (self.broker.version_load(source) == 0
                and self.broker.pinned_quiet_for(source, now) >= config.DRAIN_QUIET_S)

    def _step_rolling_back(self, rot: Rotation, now: float) -> None:
        if self.broker.version_load(rot.target) > 0 and now - rot.phase_since < \
                rot.drain_timeout_s:
            return  # a canary's in-flight requests finish first
        self.supervisor.retire_version(rot.target)
        if self.supervisor.has_workers(rot.target):
            return
        if rot.source is not None and rot.strategy == "rolling":
            # Rolling retired old workers to make room: bring them back before reporting.
            self.supervisor.set_workers(rot.source, rot.source_workers)
            if self.supervisor.count(rot.source, READY) < rot.source_workers:
                return
        self._finish(rot, Phase.FAILED)

    # -- transitions -------------------------------------------------------------------------

    def _switch(self, rot: Rotation) -> None:
        """The one step that moves traffic: open the new lane, point routing at it."""
        self.supervisor.set_routing(rot.target, Routing.OPEN)
        if rot.canary is not None and rot.source is not None:
            self.broker.set_active(rot.source, canary=(rot.target, rot.canary))
            rot.switched = True
            self._enter(rot, Phase.CANARY)
            return
        self.broker.set_active(rot.target)
        rot.switched = True
        rot.registry_previous = self.registry.data["previous"]
        self.registry.put_version(rot.target, rot.path, auto_load=True)
        self._record_active(rot.target, rot.source)
        self.registry.log("switched", rotation=rot.id, target=rot.target, source=rot.source)
        self.registry.save()
        if rot.bake_s is not None and rot.source is not None:
            # Recorded now, the bake's span starts at the switch itself, not at the last
            # record before it (which would count a canary's last errors against the bake).
            now = self.clock()
            self.recent.record(now)
            rot.bake_baseline = self.recent.traffic(rot.source, now - BAKE_BASELINE_S)
            self._enter(rot, Phase.BAKING)
            return
        self._enter(rot, Phase.DRAINING)

    def _record_active(self, active: str, previous: str | None) -> None:
        """The registry's active version, loaded again by a restart; the other one is not."""
        entry = self.registry.version(previous or "")
        if entry is not None:
            entry["auto_load"] = False
        entry = self.registry.version(active)
        if entry is not None:
            entry["auto_load"] = True
        self.registry.set_active(active)

    def _begin_rollback(self, rot: Rotation, reason: str) -> None:
        rot.reason = reason
        log.error("rotation %d to %s: %s; rolling back", rot.id, rot.target, reason)
        if rot.phase == Phase.CANARY and rot.source is not None:
            self.broker.set_active(rot.source)
            self.supervisor.set_routing(rot.target, Routing.CLOSED)
        self._enter(rot, Phase.ROLLING_BACK)

    def _finish(self, rot: Rotation, phase: Phase) -> None:
        self._enter(rot, phase)
        self.registry.log("rotation_finished", rotation=rot.id, target=rot.target,
                          source=rot.source, outcome=rot.outcome, reason=rot.reason,
                          strategy=rot.strategy, timings=rot.timings,
                          quality=None if rot.quality is None else rot.quality.as_dict())
        self.registry.save()
        if self.on_finish is not None:
            self.on_finish(rot)

    def _enter(self, rot: Rotation, phase: Phase) -> None:
        now = self.clock()
        spent = now - rot.phase_since
        if rot.phase != Phase.IDLE:
            rot.timings[rot.phase.value] = round(rot.timings.get(rot.phase.value, 0) + spent, 3)
        log.info("rotation %d: %s -> %s (%.3fs in %s)", rot.id, rot.phase.value, phase.value,
                 spent, rot.phase.value,
                 extra={"event": "rotation_phase", "rotation": rot.id, "target": rot.target,
                        "source": rot.source, "from_phase": rot.phase.value,
                        "to_phase": phase.value, "seconds": round(spent, 3)})
        rot.phase, rot.phase_since = phase, now

    # -- rolling helpers ---------------------------------------------------------------------

    def _first_round(self, rot: Rotation) -> int:
        return 1 if rot.strategy == "rolling" else rot.workers

    def _rolling_step(self, rot: Rotation) -> bool:
        """Advance a rolling replacement by at most one worker; True once all new are ready.

        Invariant: old and new processes together never exceed the larger of the old and
        the new worker counts, so the device never holds more models than it did before or
        than the new version needs. One old worker drains and exits, then one new worker
        loads and passes its check, and so on.
        """
        assert rot.source is not None
        ready = self.supervisor.count(rot.target, READY)
        if ready >= rot.workers:
            return True
        new_live = self.supervisor.count(rot.target, *LIVE)
        if new_live > ready:
            return False  # the newest worker is still loading or being checked
        most = max(rot.workers, rot.source_workers)
        old_total = self.supervisor.count(rot.source, *LIVE, DRAINING, STOPPING)
        if old_total + new_live >= most:
            self.supervisor.set_workers(rot.source, max(0, most - new_live - 1))
            return False  # wait until that old worker has exited
        self.supervisor.set_workers(rot.target, new_live + 1)
        return False

    def _choose_strategy(self, source: str | None, workers: int) -> tuple[str, str]:
        """surge if measured free memory holds a second set of workers, else rolling."""
        if source is None:
            return "surge", "auto: nothing serves yet"
        per_worker_cpu = self.supervisor.memory_per_worker(source)
        gpu = [w for w in self.supervisor.worker_views() if w.gpu_memory_bytes]
        if gpu:
            need = max(w.gpu_memory_bytes for w in gpu) * workers * MEMORY_HEADROOM
            free = _free_gpu_memory()
        else:
            need = per_worker_cpu * workers * MEMORY_HEADROOM
            free = psutil.virtual_memory().available
        choice = "surge" if free >= need else "rolling"
        where = "GPU" if gpu else "RAM"
        reason = (f"auto: a second set of {workers} workers needs {need / 2**20:.0f} MiB of "
                  f"{where}, {free / 2**20:.0f} MiB free")
        log.info("%s -> %s", reason, choice)
        return choice, reason

    def status(self) -> dict[str, Any] | None:
        rot = self.current
        return rot.as_dict(self.clock()) if rot is not None else None


def hand_over(events: list[BrokerEvent], supervisor: Supervisor,
              rotations: RotationController) -> None:
    """The broker's events to whoever acts on them: answers to the quality gate's probes to
    the rotation, everything else to the supervisor (how `pool serve` wires them)."""
    for event in events:
        if isinstance(event, ProbeAnswered) and event.purpose == QUALITY_PROBE:
            rotations.handle(event)
        else:
            supervisor.handle(event)


def _free_gpu_memory() -> int:
    """The smallest free memory over the visible GPUs (NVML); 0 if unknown, which picks
    rolling, the safe choice."""
    gpus, _ = gpu_stats()
    return min((g["memory_total_bytes"] - g["memory_used_bytes"] for g in gpus), default=0)
