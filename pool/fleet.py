"""A version rolled across a fleet of pools with zero failed requests.

    survey -> lease -> canary (rotate, bake, judged against the rest) -> the rest,
    `max_parallel` at a time -> release
                 \\ any failure or regression: every rotated pool rotates back -> release

Each pool rotates itself (pool/rotation.py: a surge rotation never fails a request); this
module only decides the order, judges the canary and undoes what it did. The canary bakes in
its pool (the pool's own judge compares v2 with v1 there) while this module compares the
canary's v2 replies, as that bake counts them, with the rest of the fleet's over the same
seconds, with the same judge (pool.judge). Every pool is leased for the rollout's length
(the `lease` control command), so a second fleet rotation, or a plain `pool rotate`, is
refused while one runs.

A pool already on the target version when the rollout starts counts as rotated: running the
same `pool fleet rotate` again after an interruption continues where it stopped (and no
second canary is needed once one pool serves the new version).

Pools are reached through `PoolLink.request(command, **args)`, which the CLI builds from
endpoints (remote control over CurveZMQ) and tests from whatever reaches their pools.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pool.judge import BakeLimits, Traffic, Verdict, judge
from pool.metrics import RATE_WINDOW_S
from router import protocol

log = logging.getLogger("zeropool.fleet")

POLL_S = 0.25  # how often a rotating pool's rotation is read (a rotation takes ~1 s on CPU)
SAMPLE_S = 1.0  # how often every pool's status is read: the traffic points, lease renewals
LEASE_TTL_S = 60.0  # renewed every poll: a rollout that dies frees its pools within this
ROTATION_TIMEOUT_S = 1800.0  # one pool's rotation (a large model loading on a busy GPU)
ROTATIONS_BACK = 2  # tries at rotating a pool back before the rollback reports it failed


class FleetError(RuntimeError):
    """The rollout cannot start, or cannot go on: the message says which pool and why."""


class RolloutFailed(RuntimeError):
    """A rotation failed or the canary regressed: every rotated pool is rotated back."""


@dataclass
class PoolLink:
    name: str  # as the operator named it (an endpoint)
    request: Callable[..., dict[str, Any]]  # (command, **args) -> reply; raises on failure


@dataclass
class PoolReport:
    name: str
    before: str | None  # its active version when the rollout started
    phase: str = "waiting"  # waiting | rotating | baking | done | on_target | rolling_back
    #                         | rolled_back | failed
    started_s: float | None = None  # since the rollout began
    finished_s: float | None = None
    rotation: dict[str, Any] | None = None  # the pool's own record of its last rotation
    reason: str | None = None


@dataclass
class TrafficPoint:
    """The fleet's replies over one poll interval."""

    t_s: float
    requests_per_s: float
    errors: int
    p99_ms: float | None  # the highest of the pools' (each over its last 10 s)
    versions: dict[str, str | None]  # pool -> active version


@dataclass
class FleetReport:
    target: str
    source: str | None
    outcome: str = "running"  # done | rolled_back | failed
    reason: str | None = None
    pools: list[PoolReport] = field(default_factory=list)
    traffic: list[TrafficPoint] = field(default_factory=list)
    canary: dict[str, Any] | None = None  # the fleet judge's last verdict on the canary
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Counters:
    """A pool's cumulative reply counts, as its status reports them."""

    replies: int
    faults: int
    p99_ms: float | None  # over the pool's last RATE_WINDOW_S, not since anything
    p99_replies: int  # about how many replies that p99 rests on (its rate over that window)

    @classmethod
    def of(cls, status: dict[str, Any]) -> Counters:
        requests = status.get("requests") or {}
        by_code = requests.get("errors_by_code") or {}
        return cls(int(requests.get("ok", 0)) + int(requests.get("errors", 0)),
                   sum(int(n) for code, n in by_code.items() if code in protocol.POOL_FAULTS),
                   (status.get("latency_ms") or {}).get("p99"),
                   round(float(status.get("requests_per_s") or 0.0) * RATE_WINDOW_S))

    def since(self, earlier: Counters) -> Traffic:
        return Traffic(max(0, self.replies - earlier.replies),
                       max(0, self.faults - earlier.faults), self.p99_ms,
                       latency_over=self.p99_replies)


def sum_traffic(parts: Sequence[Traffic]) -> Traffic:
    """Several pools' traffic as one: counts summed, the median pool's p99 (with the
    replies it rests on: the judge needs enough of those, not of the sums)."""
    timed = sorted((t for t in parts if t.p99_ms is not None), key=lambda t: t.p99_ms or 0.0)
    median = timed[len(timed) // 2] if timed else None
    return Traffic(sum(t.requests for t in parts), sum(t.errors for t in parts),
                   None if median is None else median.p99_ms,
                   latency_over=None if median is None else median.latency_over)


class FleetRollout:
    """Rotates `pools` to `target`: one canary first (baked for `bake_s` when given), then
    the others `max_parallel` at a time; rolls every rotated pool back on a failure."""

    def __init__(self, pools: Sequence[PoolLink], target: str, path: str | None, *,
                 bake_s: float | None = None, max_parallel: int = 1,
                 limits: BakeLimits | None = None, strategy: str = "auto",
                 eval_set: str | None = None, owner: str | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 on_progress: Callable[[FleetReport], None] | None = None) -> None:
        if not pools:
            raise FleetError("no pools given")
        names = [p.name for p in pools]
        if len(set(names)) != len(names):
            raise FleetError(f"a pool is named twice: {', '.join(names)}")
        if max_parallel < 1:
            raise FleetError("--max-parallel is at least 1")
        self.pools = list(pools)
        self.target, self.path = target, path
        self.bake_s, self.max_parallel = bake_s, max_parallel
        self.limits = limits or BakeLimits()
        self.strategy = strategy
        self.eval_set = eval_set  # every pool's rotation passes this quality gate first
        self.owner = owner or f"fleet-{uuid.uuid4().hex[:8]}"
        self.clock, self.sleep = clock, sleep
        self.on_progress = on_progress
        self.report = FleetReport(target, None)
        self._started = clock()
        self._counters: dict[str, Counters] = {}  # each pool's, as of the last poll
        self._canary_since: dict[str, Counters] | None = None  # every pool's at its switch
        self._sampled_at = self._started
        self._leased: list[PoolLink] = []

    # -- the rollout ---------------------------------------------------------------------------

    def run(self) -> FleetReport:
        statuses = self._survey()
        self.report.source = self._source_version(statuses)
        self.report.pools = [PoolReport(p.name, statuses[p.name].get("active"))
                             for p in self.pools]
        self._lease_all()
        try:
            self._rotate_fleet()
            self.report.outcome = "done"
        except RolloutFailed as exc:
            self.report.reason = str(exc)
            log.error("fleet rotation to %s: %s; rotating every rotated pool back",
                      self.target, exc)
            self.report.outcome = "rolled_back" if self._roll_back() else "failed"
        finally:
            self._release_all()
            self.report.seconds = round(self.clock() - self._started, 3)
            self._progress()
        return self.report

    def _rotate_fleet(self) -> None:
        waiting = [p for p in self.pools if self._pool(p).before != self.target]
        for link in self.pools:
            if self._pool(link).before == self.target:
                self._pool(link).phase = "on_target"
        if waiting and len(waiting) == len(self.pools):
            self._rotate([waiting.pop(0)], canary=True)
        while waiting:
            group, waiting = waiting[:self.max_parallel], waiting[self.max_parallel:]
            self._rotate(group, canary=False)

    def _rotate(self, group: list[PoolLink], canary: bool) -> None:
        """Start each pool's rotation, then poll them all until each ends; raise
        RolloutFailed at the first failure (the others in the group finish or are undone by
        the rollback)."""
        for link in group:
            pool = self._pool(link)
            pool.phase, pool.started_s = "rotating", self._elapsed()
            args: dict[str, Any] = {"version": self.target, "strategy": self.strategy,
                                    "lease": self.owner}
            if self.path:
                args["path"] = self.path
            if self.eval_set:
                args["eval"] = self.eval_set
            if canary and self.bake_s:
                args |= {"bake": self.bake_s, "max_error_rate": self.limits.max_error_rate,
                         "max_p99_ratio": self.limits.max_p99_ratio}
            try:
                reply = link.request("rotate", **args)
            except Exception as exc:
                pool.phase, pool.reason = "failed", f"could not start: {exc}"
                raise RolloutFailed(f"{link.name}: rotation to {self.target} refused: "
                                    f"{exc}") from None
            pool.rotation = reply.get("rotation")
        self._progress()
        started = self.clock()
        # The canary's bake is part of its rotation, on top of the time any rotation gets.
        deadline = started + ROTATION_TIMEOUT_S + ((self.bake_s or 0) if canary else 0)
        running = list(group)
        while running:
            self._sleep_and_sample()
            for link in list(running):
                if self._follow(link, canary):
                    running.remove(link)
            if running and self.clock() > deadline:
                raise RolloutFailed(f"{', '.join(p.name for p in running)}: rotation still "
                                    f"running after {deadline - started:.0f}s")

    def _follow(self, link: PoolLink, canary: bool) -> bool:
        """One look at one pool's rotation; True once it is done."""
        pool = self._pool(link)
        rotation = self._rotation_of(link)
        pool.rotation = rotation
        phase = rotation.get("phase")
        if phase == "baking":
            if pool.phase != "baking":
                pool.phase = "baking"
                self._progress()
            if canary:
                self._judge_canary(link, rotation)
            return False
        if rotation.get("outcome") == "done":
            pool.phase, pool.finished_s = "done", self._elapsed()
            self._progress()
            return True
        if rotation.get("outcome") is not None:
            pool.phase, pool.finished_s = "failed", self._elapsed()
            pool.reason = rotation.get("reason") or rotation.get("outcome")
            raise RolloutFailed(f"{link.name}: rotation to {self.target} "
                                f"{rotation.get('outcome')}: {pool.reason}")
        return False

    def _judge_canary(self, canary: PoolLink, rotation: dict[str, Any]) -> None:
        """The canary's new version since its switch (as its own bake counts it: the pool's
        whole p99 would still hold the rotation's loading) against the rest of the fleet's
        replies since then."""
        if self._canary_since is None:
            self._canary_since = dict(self._counters)
            return
        start = self._canary_since
        rest = [self._counters[p.name].since(start[p.name]) for p in self.pools
                if p is not canary and p.name in start and p.name in self._counters]
        baked = ((rotation.get("bake") or {}).get("verdict") or {}).get("candidate")
        if not rest or baked is None:
            return  # one pool alone: its own bake is the judge; or not judged there yet
        verdict: Verdict = judge(sum_traffic(rest), Traffic.of(baked), self.limits,
                                 (f"canary {canary.name}", "the rest of the fleet"))
        self.report.canary = verdict.as_dict()
        if verdict.regressed:
            try:
                canary.request("rollback", lease=self.owner)  # switches back at once
            except Exception as exc:  # the rollback below tries again
                log.warning("canary %s: rollback refused: %s", canary.name, exc)
            raise RolloutFailed(f"canary {canary.name} regressed against the rest of the "
                                f"fleet: {verdict.reason}")

    def _roll_back(self) -> bool:
        """Every pool that left the source version goes back to it; True if all did."""
        source = self.report.source
        touched = [link for link in self.pools
                   if self._pool(link).phase in ("rotating", "baking", "done", "on_target",
                                                 "failed")]
        all_back = True
        for link in touched:
            pool = self._pool(link)
            pool.phase = "rolling_back"
            try:
                self._roll_back_one(link, source)
                pool.phase = "rolled_back"
            except Exception as exc:
                pool.phase, pool.reason = "failed", f"rollback failed: {exc}"
                all_back = False
            pool.finished_s = self._elapsed()
            self._progress()
        return all_back

    def _roll_back_one(self, link: PoolLink, source: str | None) -> None:
        """Abort what is in progress (a bake switches back at once), let a switched rotation
        or a rollback under way finish, then rotate back to `source` as `pool rollback`
        does (no quality gate: it served before): at most ROTATIONS_BACK tries."""
        deadline = self.clock() + ROTATION_TIMEOUT_S
        tries = 0
        while self.clock() < deadline:
            status = link.request("status")
            rotation = status.get("rotation") or {}
            running = bool(rotation) and rotation.get("outcome") is None
            if not running and (source is None or status.get("active") == source):
                return
            if running and rotation.get("target") != source and \
                    rotation.get("phase") not in ("draining", "rolling_back"):
                self._abort(link, source)
            elif not running:
                tries += 1
                if tries > ROTATIONS_BACK:
                    raise FleetError(f"{link.name} could not rotate back to {source}: "
                                     f"{rotation.get('reason')}")
                link.request("rollback", version=source, lease=self.owner)
            self._sleep_and_sample()
        raise FleetError(f"{link.name} did not return to {source} in {ROTATION_TIMEOUT_S}s")

    def _abort(self, link: PoolLink, source: str | None) -> None:
        """Roll back the rotation in progress (a bake switches back at once). If it ended
        meanwhile, the pool rotates back to `source` instead; if it just switched, this is
        refused, and the next look at the pool decides again."""
        args = {"version": source} if source else {}
        try:
            link.request("rollback", lease=self.owner, **args)
        except Exception as exc:  # a link raises whatever its transport does
            log.warning("%s: rollback refused (%s); looking again", link.name, exc)

    # -- before anything changes ------------------------------------------------------------------

    def _survey(self) -> dict[str, dict[str, Any]]:
        statuses: dict[str, dict[str, Any]] = {}
        problems = []
        for link in self.pools:
            try:
                statuses[link.name] = link.request("status")
            except Exception as exc:
                problems.append(f"{link.name}: {exc}")
        if problems:
            raise FleetError("cannot reach every pool, nothing was changed: " +
                             "; ".join(problems))
        for link in self.pools:
            lease = statuses[link.name].get("lease") or {}
            if lease and lease.get("owner") != self.owner:
                raise FleetError(f"{link.name} is leased to {lease.get('owner')} (another fleet "
                                 f"rotation) for {lease.get('expires_in_s')}s more: wait for "
                                 "it to end; nothing was changed")
            rotation = statuses[link.name].get("rotation") or {}
            if rotation and rotation.get("outcome") is None:
                raise FleetError(f"{link.name} is rotating (rotation {rotation.get('id')} to "
                                 f"{rotation.get('target')}, {rotation.get('phase')}): wait "
                                 "for it or `pool rollback` it; nothing was changed")
        self._counters = {name: Counters.of(status) for name, status in statuses.items()}
        return statuses

    def _source_version(self, statuses: dict[str, dict[str, Any]]) -> str | None:
        others = {name: s.get("active") for name, s in statuses.items()
                  if s.get("active") != self.target}
        versions = set(others.values())
        if len(versions) > 1:
            listing = ", ".join(f"{name} on {v}" for name, v in sorted(others.items()))
            raise FleetError(f"the pools serve different versions ({listing}): rotate them to "
                             f"one first; nothing was changed")
        return versions.pop() if versions else self.target

    def _lease_all(self) -> None:
        for link in self.pools:
            try:
                link.request("lease", owner=self.owner, ttl_s=LEASE_TTL_S)
            except Exception as exc:
                self._release_all()
                raise FleetError(f"{link.name}: {exc}; nothing was changed") from None
            self._leased.append(link)

    def _release_all(self) -> None:
        for link in self._leased:
            try:
                link.request("lease", owner=self.owner, release=True)
            except Exception as exc:  # it expires on its own
                log.warning("%s: lease not released (%s); it expires in %.0fs", link.name,
                            exc, LEASE_TTL_S)
        self._leased = []

    # -- polling -----------------------------------------------------------------------------------

    def _sleep_and_sample(self) -> None:
        """Wait a poll interval; once a SAMPLE_S, read every pool's status: the fleet's
        traffic point, and every lease renewed."""
        self.sleep(POLL_S)
        if self.clock() - self._sampled_at < SAMPLE_S:
            return
        interval = self.clock() - self._sampled_at
        self._sampled_at = self.clock()
        before, versions = dict(self._counters), {}
        p99s: list[float] = []
        for link in self.pools:
            try:
                status = link.request("status")
                link.request("lease", owner=self.owner, ttl_s=LEASE_TTL_S)
            except Exception as exc:  # a pool that stops answering mid-rollout
                log.warning("%s: no status (%s)", link.name, exc)
                versions[link.name] = None
                continue
            versions[link.name] = status.get("active")
            counters = Counters.of(status)
            self._counters[link.name] = counters
            if counters.p99_ms is not None:
                p99s.append(counters.p99_ms)
        span = [self._counters[n].since(before[n]) for n in self._counters if n in before]
        self.report.traffic.append(TrafficPoint(
            round(self._elapsed(), 2), round(sum(t.requests for t in span) / interval, 1),
            sum(t.errors for t in span), max(p99s) if p99s else None, versions))
        self._progress()

    def _rotation_of(self, link: PoolLink) -> dict[str, Any]:
        try:
            return link.request("rotation").get("rotation") or {}
        except Exception as exc:
            raise RolloutFailed(f"{link.name} stopped answering during its rotation: "
                                f"{exc}") from None

    def _pool(self, link: PoolLink) -> PoolReport:
        return next(p for p in self.report.pools if p.name == link.name)

    def _elapsed(self) -> float:
        return self.clock() - self._started

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.report)


def previous_version(pools: Sequence[PoolLink]) -> str:
    """What a fleet rollback returns to: the previous version of the pools on the fleet's
    newest version (the one most pools serve). FleetError if that is not one version."""
    statuses = []
    for link in pools:
        try:
            statuses.append(link.request("status"))
        except Exception as exc:
            raise FleetError(f"cannot reach {link.name}: {exc}") from None
    actives = Counter(s.get("active") for s in statuses).most_common()
    if len(actives) > 1 and actives[0][1] == actives[1][1]:
        raise FleetError("as many pools serve one version as another: name the version to "
                         "return to with --to")
    newest = actives[0][0]
    previous = {s.get("previous") for s in statuses if s.get("active") == newest} - {None}
    if len(previous) != 1:
        raise FleetError(f"the pools on {newest} have no one previous version "
                         f"({', '.join(sorted(previous)) or 'none'}): name it with --to")
    return previous.pop()


def fleet_status(pools: Sequence[PoolLink]) -> list[dict[str, Any]]:
    """One row per pool: reachable or why not, version, health, traffic, rotation."""
    rows = []
    for link in pools:
        try:
            status = link.request("status")
        except Exception as exc:
            rows.append({"pool": link.name, "reachable": False, "error": str(exc)})
            continue
        rotation = status.get("rotation") or {}
        rows.append({
            "pool": link.name, "reachable": True, "active": status.get("active"),
            "state": status.get("state"), "requests_per_s": status.get("requests_per_s"),
            "latency_ms": status.get("latency_ms"),
            "workers": len(status.get("workers") or []),
            "errors": (status.get("requests") or {}).get("errors"),
            "rotation": {k: rotation.get(k) for k in ("id", "target", "phase", "outcome")}
            if rotation else None,
            "lease": status.get("lease"),
        })
    return rows
