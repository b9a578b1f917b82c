"""The fleet rollout's decisions on a fake clock: simulated pools that rotate as a pool's
control commands say (tests/test_fleet_pools.py runs it on real pools)."""

from __future__ import annotations

from typing import Any

import pytest

from cli.fleet import pool_entries, pool_links
from pool.control import ControlError
from pool.fleet import FleetError, FleetRollout, PoolLink, previous_version
from pool.judge import BakeLimits

SWITCH_AFTER_S = 2.0  # a simulated rotation: spawn, load, check
DRAIN_S = 1.0
REQUESTS_PER_S = 100


class Clock:
    def __init__(self, pools: list[SimPool]) -> None:
        self.now = 0.0
        self.pools = pools

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        for _ in range(round(seconds * 10)):
            self.now += 0.1
            for pool in self.pools:
                pool.advance(0.1)


class SimPool:
    """A pool as its control commands show it: a rotation that switches after 2 s, bakes,
    drains; its replies counted; optionally broken."""

    def __init__(self, name: str, active: str = "v1", *, fails_health: bool = False,
                 errors_on: str | None = None, unreachable: bool = False,
                 slow_while_rotating: bool = False) -> None:
        self.name = name
        self.active = active
        self.previous: str | None = None
        self.fails_health = fails_health
        self.errors_on = errors_on  # a version that fails a fifth of its requests here
        self.unreachable = unreachable
        # Its whole p99 rises while a rotation loads beside the serving workers (the new
        # version's own replies are as fast as the old one's).
        self.slow_while_rotating = slow_while_rotating
        self.rotation: dict[str, Any] | None = None
        self.lease: tuple[str, float] | None = None
        self.ok = self.errors = 0
        self.t = 0.0
        self.rotations: list[str] = []  # targets asked for, in order
        self.evals: list[str | None] = []  # the quality gate each rotation was asked with
        self.started_at: list[float] = []
        self.at_switch = (0, 0)  # (ok, errors) when its rotation switched

    def link(self, clock: Clock) -> PoolLink:
        self.clock = clock
        return PoolLink(self.name, self.request)

    # -- the control commands ------------------------------------------------------------------

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        if self.unreachable:
            raise ControlError(f"the pool did not answer {cmd!r} within 5.0s")
        if cmd in ("rotate", "rollback", "lease"):
            self._check_lease(args.get("lease") or args.get("owner"))
        return getattr(self, f"_{cmd}")(**args)

    def _check_lease(self, owner: str | None) -> None:
        if self.lease and self.lease[1] > self.t and self.lease[0] != owner:
            raise ControlError(f"this pool is leased to {self.lease[0]}")

    def _status(self) -> dict[str, Any]:
        return {"active": self.active, "previous": self.previous, "rotation": self.rotation,
                "state": "serving",
                "lease": self.lease and {"owner": self.lease[0],
                                         "expires_in_s": self.lease[1] - self.t},
                "requests": {"ok": self.ok, "errors": self.errors,
                             "errors_by_code": {"internal": self.errors}},
                "latency_ms": {"p50": 5.0, "p99": 40.0 if self._rotating() else 9.0},
                "requests_per_s": float(REQUESTS_PER_S),
                "workers": [1, 2]}

    def _rotating(self) -> bool:
        return self.slow_while_rotating and self.rotation is not None and \
            self.rotation["outcome"] is None

    def _rotation(self) -> dict[str, Any]:
        return {"rotation": self.rotation}

    def _lease(self, owner: str, ttl_s: float = 60.0, release: bool = False) -> dict:
        self.lease = None if release else (owner, self.t + ttl_s)
        return {"lease": None}

    def _rotate(self, version: str, lease: str | None = None, bake: float | None = None,
                **extra: Any) -> dict[str, Any]:
        if self.rotation and self.rotation["outcome"] is None:
            raise ControlError("a rotation is running")
        self.rotations.append(version)
        self.evals.append(extra.get("eval"))
        self.started_at.append(self.clock.now)
        self.rotation = {"id": len(self.rotations), "source": self.active, "target": version,
                         "phase": "loading", "outcome": None, "reason": None,
                         "since": self.t,
                         "bake": bake and {"seconds": bake, "verdict": None}}
        return {"rotation": self.rotation}

    def _rollback(self, lease: str | None = None, version: str | None = None) -> dict[str, Any]:
        """As a pool's `rollback`: abort what runs, else rotate back (ungated) to `version`
        or the previous one."""
        rot = self.rotation
        if rot and rot["outcome"] is None and rot["phase"] in ("loading", "baking"):
            if rot["phase"] == "baking":
                self.active = rot["source"]
            rot.update(phase="rolling_back", outcome="rolled_back", reason="rolled back")
            return {"rotation": rot}
        back = version or self.previous
        if back is None or (rot and rot["outcome"] is None):
            raise ControlError("nothing to roll back")
        reply = self._rotate(back)
        self.evals[-1] = "ungated"  # a rotation back is not gated: it served before
        return reply

    # -- time passing -------------------------------------------------------------------------

    def advance(self, dt: float) -> None:
        self.t += dt
        failing = self.errors_on is not None and self.active == self.errors_on
        per_tick = int(REQUESTS_PER_S * dt)
        bad = per_tick // 5 if failing else 0
        self.ok += per_tick - bad
        self.errors += bad
        rot = self.rotation
        if rot is None or rot["outcome"] is not None:
            return
        elapsed = self.t - rot["since"]
        if rot["phase"] == "loading" and elapsed >= SWITCH_AFTER_S:
            if self.fails_health:
                rot.update(outcome="rolled_back", phase="failed",
                           reason="health check: scores off")
                return
            self.previous, self.active = self.active, rot["target"]
            rot["phase"], rot["since"] = ("baking" if rot["bake"] else "draining"), self.t
            self.at_switch = (self.ok, self.errors)
        elif rot["phase"] == "baking":
            # The pool's own count of the new version's replies since the switch, as a real
            # pool's bake verdict carries it (its own judge is left out here).
            ok, errors = self.ok - self.at_switch[0], self.errors - self.at_switch[1]
            rot["bake"]["verdict"] = {"candidate": {"requests": ok + errors, "errors": errors,
                                                    "p99_ms": 9.0}}
            if elapsed >= rot["bake"]["seconds"]:
                rot["phase"], rot["since"] = "draining", self.t
        elif rot["phase"] == "draining" and elapsed >= DRAIN_S:
            rot.update(phase="done", outcome="done")


def rollout(pools: list[SimPool], **options: Any) -> tuple[FleetRollout, Clock]:
    clock = Clock(pools)
    links = [pool.link(clock) for pool in pools]
    return FleetRollout(links, "v2", "/models/v2", clock=clock, sleep=clock.sleep,
                        **options), clock


def test_a_fleet_rotates_a_canary_first_then_one_pool_at_a_time() -> None:
    pools = [SimPool("a"), SimPool("b"), SimPool("c")]
    fleet, _ = rollout(pools, bake_s=5.0)
    report = fleet.run()
    assert report.outcome == "done", report.reason
    assert [p.active for p in pools] == ["v2"] * 3
    assert [p.phase for p in report.pools] == ["done"] * 3
    starts = [p.started_at[0] for p in pools]
    assert starts == sorted(starts)
    # The canary baked before the next pool started; the others rotated one after another.
    assert starts[1] - starts[0] >= SWITCH_AFTER_S + 5.0
    assert starts[2] - starts[1] >= SWITCH_AFTER_S + DRAIN_S
    assert pools[0].rotation["bake"]["seconds"] == 5.0 and pools[1].rotation["bake"] is None
    assert report.canary is not None and not report.canary["regressed"]
    assert report.traffic and report.traffic[-1].versions == {"a": "v2", "b": "v2", "c": "v2"}
    assert all(point.errors == 0 for point in report.traffic)
    assert all(p.lease is None for p in pools), "leases are released"


def test_every_pools_rotation_passes_the_fleets_quality_gate() -> None:
    pools = [SimPool("a"), SimPool("b"), SimPool("c")]
    fleet, _ = rollout(pools, bake_s=5.0, eval_set="builtin:zh-pairs")
    assert fleet.run().outcome == "done"
    assert [p.evals for p in pools] == [["builtin:zh-pairs"]] * 3


def test_max_parallel_rotates_the_rest_together() -> None:
    pools = [SimPool(name) for name in "abcde"]
    fleet, _ = rollout(pools, max_parallel=2)
    assert fleet.run().outcome == "done"
    starts = [p.started_at[0] for p in pools]
    assert starts[1] == starts[2] and starts[3] == starts[4] and starts[3] > starts[2]


def test_a_version_failing_on_the_second_pool_ends_with_v1_everywhere() -> None:
    pools = [SimPool("a"), SimPool("b", fails_health=True), SimPool("c")]
    fleet, _ = rollout(pools)
    report = fleet.run()
    assert report.outcome == "rolled_back"
    assert "b: rotation to v2 rolled_back: health check: scores off" in report.reason
    assert [p.active for p in pools] == ["v1"] * 3
    assert pools[0].rotations == ["v2", "v1"], "the canary rotated back"
    assert pools[2].rotations == [], "the rollout stopped before c"
    assert [p.phase for p in report.pools] == ["rolled_back", "rolled_back", "waiting"]


def test_pools_rotate_back_without_the_quality_gate_that_judged_the_new_version() -> None:
    """v2 may score better than v1 on the gate's set: v1 must come back all the same."""
    pools = [SimPool("a"), SimPool("b", fails_health=True), SimPool("c")]
    fleet, _ = rollout(pools, eval_set="builtin:zh-pairs")
    assert fleet.run().outcome == "rolled_back"
    assert pools[0].rotations == ["v2", "v1"]
    assert pools[0].evals == ["builtin:zh-pairs", "ungated"]


def test_a_canary_bake_longer_than_a_rotations_timeout_runs_to_its_end() -> None:
    from pool.fleet import ROTATION_TIMEOUT_S

    pools = [SimPool("a"), SimPool("b")]
    fleet, _ = rollout(pools, bake_s=ROTATION_TIMEOUT_S + 600)
    report = fleet.run()
    assert report.outcome == "done", report.reason
    assert [p.active for p in pools] == ["v2", "v2"]


def test_a_canary_that_fails_more_than_the_rest_of_the_fleet_is_switched_back() -> None:
    pools = [SimPool("a", errors_on="v2"), SimPool("b"), SimPool("c")]
    fleet, _ = rollout(pools, bake_s=30.0, limits=BakeLimits(max_error_rate=0.01))
    report = fleet.run()
    assert report.outcome == "rolled_back"
    assert report.reason.startswith("canary a regressed against the rest of the fleet")
    assert report.canary["regressed"] and report.canary["candidate"]["errors"] > 0
    assert [p.active for p in pools] == ["v1"] * 3
    assert pools[1].rotations == [] and pools[2].rotations == []
    # Switched back during its bake, well before the bake's end.
    assert pools[0].rotation["outcome"] == "rolled_back"
    assert report.seconds < SWITCH_AFTER_S + 30.0


def test_a_canary_is_judged_on_its_new_versions_replies_not_its_rotations_load() -> None:
    """The canary pool's whole p99 holds the rotation's loading; the fleet judges the new
    version's replies since the switch, as the pool's own bake counts them."""
    pools = [SimPool("a", slow_while_rotating=True), SimPool("b"), SimPool("c")]
    fleet, _ = rollout(pools, bake_s=30.0)
    report = fleet.run()
    assert report.outcome == "done", report.reason
    assert report.canary["candidate"]["p99_ms"] == 9.0 and not report.canary["regressed"]
    assert [p.active for p in pools] == ["v2"] * 3


def test_running_it_again_after_an_interruption_continues_without_a_second_canary() -> None:
    pools = [SimPool("a", active="v2"), SimPool("b"), SimPool("c")]
    fleet, _ = rollout(pools, bake_s=5.0)
    report = fleet.run()
    assert report.outcome == "done"
    assert report.source == "v1"
    assert pools[0].rotations == [] and report.pools[0].phase == "on_target"
    assert pools[1].rotation["bake"] is None, "a pool already serves v2: no canary again"
    assert [p.active for p in pools] == ["v2"] * 3


@pytest.mark.parametrize("case, message", [
    ("unreachable", "cannot reach every pool, nothing was changed: b: the pool did not"),
    ("mixed", "the pools serve different versions (a on v1, b on v3)"),
    ("rotating", "b is rotating (rotation 1 to v9, loading)"),
    ("leased", "b is leased to fleet-other (another fleet rotation)"),
])
def test_bad_fleets_are_refused_and_nothing_changes(case: str, message: str) -> None:
    pools = [SimPool("a"), SimPool("b", unreachable=case == "unreachable",
                                   active="v3" if case == "mixed" else "v1")]
    fleet, _ = rollout(pools)
    if case == "rotating":
        pools[1]._rotate("v9")
    if case == "leased":
        pools[1].lease = ("fleet-other", 60.0)
    with pytest.raises(FleetError) as raised:
        fleet.run()
    assert message in str(raised.value)
    assert pools[0].rotations == [] and pools[0].active == "v1"
    assert pools[0].lease is None, "a lease taken before the refusal is given back"


def test_a_fleet_needs_distinct_pools_and_a_parallelism() -> None:
    pool = SimPool("a")
    clock = Clock([pool])
    with pytest.raises(FleetError, match="named twice"):
        FleetRollout([pool.link(clock), pool.link(clock)], "v2", None)
    with pytest.raises(FleetError, match="no pools"):
        FleetRollout([], "v2", None)
    with pytest.raises(FleetError, match="max-parallel"):
        FleetRollout([pool.link(clock)], "v2", None, max_parallel=0)


def test_a_fleet_rollback_returns_every_pool_to_the_previous_version() -> None:
    pools = [SimPool(name) for name in "abc"]
    fleet, _ = rollout(pools)
    assert fleet.run().outcome == "done"
    back, _ = rollout(pools)
    back.target = previous_version([pool.link(back.clock) for pool in pools])
    assert back.target == "v1"
    report = back.run()
    assert report.outcome == "done" and [p.active for p in pools] == ["v1"] * 3


def test_pools_are_named_by_endpoint_state_directory_or_dns_name() -> None:
    resolve = {("pools.zp.svc", 5560): ["10.0.0.7", "10.0.0.5"]}
    entries = pool_entries("tcp://10.0.0.9:5560, /srv/zp/a,dns://pools.zp.svc:5560",
                           resolve=lambda name, port: resolve[(name, port)])
    assert entries == ["tcp://10.0.0.9:5560", "/srv/zp/a", "tcp://10.0.0.5:5560",
                       "tcp://10.0.0.7:5560"]
    with pytest.raises(FleetError, match="no pool"):
        pool_entries(" , ")
    with pytest.raises(ValueError, match="dns://NAME:PORT"):
        pool_entries("dns://pools")
    with pytest.raises(FleetError, match="operator's keys"):
        pool_links(["tcp://10.0.0.9:5560"], None)


def test_the_rest_of_the_fleets_p99_counts_the_replies_it_rests_on() -> None:
    """A pool's status p99 is over its last 10 s, whatever span its counts cover: a quiet
    fleet's p99 is judged only where those 10 s hold enough replies."""
    from pool.fleet import Counters, sum_traffic

    def status(ok: int, per_s: float, p99: float) -> dict[str, Any]:
        return {"requests": {"ok": ok, "errors": 0, "errors_by_code": {}},
                "latency_ms": {"p99": p99}, "requests_per_s": per_s}

    quiet = Counters.of(status(400, 5.0, 9.0)).since(Counters.of(status(100, 5.0, 9.0)))
    assert (quiet.requests, quiet.latency_replies) == (300, 50)
    busy = Counters.of(status(5000, 100.0, 12.0)).since(Counters.of(status(0, 100.0, 9.0)))
    rest = sum_traffic([quiet, busy])
    assert (rest.requests, rest.p99_ms, rest.latency_replies) == (5300, 12.0, 1000)
