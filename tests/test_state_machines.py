"""The broker, supervisor and rotation state machines in process, on a fake clock.

The end-to-end tests (test_serve, test_rotation, test_supervision, test_chaos) prove each
scenario once on real processes; these carry the combinatorics: every rotation transition
and rollback path, crash re-dispatch and its attempt limit, the drain's quiet period, crash
loops and their retry, credit, the queue bound and deadlines.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pool import config
from pool.gate import QualityGate
from pool.judge import BakeLimits, Traffic, judge
from pool.processes import SpawnFailed, SpawnPending
from pool.quality import LabelledPair
from pool.reports import BatchStats
from pool.rotation import QUALITY_TIMEOUT_S, Phase, Rotation, RotationError
from pool.supervisor import (
    CHECKING,
    DRAINING,
    LOAD_REASON_WAIT_S,
    LOADING,
    READY,
    STOPPING,
)
from router import protocol
from router.broker import MAX_ATTEMPTS, ProbeAnswered, even_shares
from tests.fakepool import FakePool, Producer


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakePool]:
    pool = FakePool(tmp_path)
    yield pool
    pool.close()


@pytest.fixture
def serving3(tmp_path: Path) -> Iterator[FakePool]:
    """Three v1 workers serving (where a rotation's worker counts matter)."""
    pool = FakePool(tmp_path, workers=3)
    yield serving(pool, workers=3)
    pool.close()


def serving(fake: FakePool, workers: int = 2) -> FakePool:
    fake.load("v1", workers=workers)
    fake.bring_up("v1")
    assert len(fake.workers_of("v1", READY)) == workers
    return fake


# -- the router: credit, queue, deadlines, re-dispatch ------------------------------------------


def test_a_probe_to_a_forgotten_worker_is_answered_worker_failed(fake: FakePool) -> None:
    """As a worker that dies holding one: its sender (a gate between two probes) learns it
    from the same event."""
    fake.broker.probe(b"v1-0-gone", "quality", protocol.OP_SIMILARITY, b"{}")
    [event] = fake.broker.take_events()
    assert isinstance(event, ProbeAnswered)
    assert (event.worker, event.purpose, event.status) == (b"v1-0-gone", "quality",
                                                            protocol.STATUS_ERROR)
    assert protocol.WORKER_FAILED.encode() in event.body and b"gone" in event.body


def test_a_worker_is_routed_to_only_after_its_health_probe_passes(fake: FakePool) -> None:
    fake.load("v1", workers=1)
    fake.tick()
    [worker] = fake.workers_of("v1")
    assert fake.state(worker) == LOADING
    producer = fake.producer()
    producer.send(b"r1")
    fake.pump()
    assert fake.broker.queued == 1  # queues while the version loads
    worker.announce()
    fake.pump()
    assert fake.state(worker) == CHECKING
    [probe] = worker.received()  # the health probe, and nothing else yet
    assert len(probe.body["pairs"]) >= 12
    worker.answer(probe)
    fake.pump()
    assert fake.state(worker) == READY
    [request] = worker.received()
    assert request.body == {"pairs": [["a", "b"]]}
    worker.answer(request)
    fake.pump()
    assert producer.codes() == {b"r1": "ok"}


def test_credit_bounds_what_each_worker_holds_and_goes_to_the_least_loaded(
        fake: FakePool) -> None:
    serving(fake)
    capacity = fake.supervisor.settings.capacity
    producer = fake.producer()
    for i in range(3 * capacity):
        producer.send(str(i).encode())
    fake.pump()
    held = [len(w.received()) for w in fake.workers_of("v1")]
    assert held == [capacity, capacity]  # spread evenly, never above capacity
    assert fake.broker.queued == capacity
    assert fake.broker.inflight == 2 * capacity


def test_replies_free_credit_and_every_request_gets_one_reply(fake: FakePool) -> None:
    serving(fake)
    producer = fake.producer()
    for i in range(50):
        producer.send(str(i).encode())
    fake.pump()
    while fake.serve_all():
        pass
    assert producer.codes() == {str(i).encode(): "ok" for i in range(50)}
    assert fake.broker.queued == fake.broker.inflight == 0


def test_the_queue_bound_answers_overloaded_at_once(tmp_path: Path) -> None:
    fake = FakePool(tmp_path, max_queue=3)
    try:
        serving(fake, workers=1)
        capacity = fake.supervisor.settings.capacity
        producer = fake.producer()
        for i in range(capacity + 5):
            producer.send(str(i).encode())
        fake.pump()
        codes = producer.codes()
        assert list(codes.values()) == [protocol.OVERLOADED] * 2
        assert fake.broker.queued == 3
    finally:
        fake.close()


def test_queued_requests_time_out_by_their_timeout_ms_and_by_the_queue_timeout(
        tmp_path: Path) -> None:
    fake = FakePool(tmp_path, queue_timeout_s=5.0)
    try:
        fake.load("v1", workers=1)
        fake.tick()  # spawned, never ready: requests wait
        producer = fake.producer()
        producer.send(b"short", timeout_ms=300)
        producer.send(b"plain")
        fake.pump()
        fake.tick(0.2)
        assert producer.codes() == {}
        fake.tick(0.2)  # past 300 ms
        assert producer.codes() == {b"short": protocol.TIMEOUT}
        assert "timeout_ms=300" in producer.replies[b"short"][1]["message"]
        fake.tick(5.0)
        assert producer.codes()[b"plain"] == protocol.TIMEOUT
    finally:
        fake.close()


def test_a_crashed_workers_requests_run_again_elsewhere_exactly_once(fake: FakePool) -> None:
    serving(fake)
    producer = fake.producer()
    for i in range(4):
        producer.send(str(i).encode())
    fake.pump()
    victim = fake.workers_of("v1")[0]
    held = victim.received()
    assert held
    victim.exit(-9)
    fake.tick()  # reaped: what it held is dispatched again
    served = fake.serve_all()
    fake.pump()
    assert served >= len(held)
    assert producer.codes() == {str(i).encode(): "ok" for i in range(4)}


def test_while_no_process_can_start_requests_wait_and_are_served_once_one_can(
        fake: FakePool) -> None:
    serving(fake)
    producer = fake.producer()
    for i in range(4):
        producer.send(str(i).encode())
    fake.pump()
    fake.refuse_spawns = SpawnPending("the worker forkserver is restarting")
    for worker in fake.workers_of("v1"):  # the forkserver was killed: every worker with it
        worker.exit(-9)
    fake.tick(5.0)
    fake.tick(5.0)
    plan = fake.supervisor.plans["v1"]
    assert not fake.supervisor.workers and fake.broker.queued == 4
    assert plan.restarts == 1 and plan.failed is None  # one cause of both deaths; no waits
    fake.refuse_spawns = None
    fake.bring_up("v1")
    fake.serve_all()
    assert producer.codes() == {str(i).encode(): "ok" for i in range(4)}


def test_a_spawner_that_cannot_start_processes_counts_as_crashes(tmp_path: Path) -> None:
    fake = FakePool(tmp_path, crash_retry_s=20.0)
    try:
        serving(fake, workers=1)
        fake.refuse_spawns = SpawnFailed("the worker forkserver did not start a process")
        fake.workers_of("v1")[0].exit(-9)
        plan = fake.supervisor.plans["v1"]
        for _ in range(config.CRASH_LOOP_LIMIT):
            fake.tick(plan.backoff_until - fake.clock() + 0.1)
        assert plan.crash_loop is not None
        assert "no worker process could start" in plan.crash_loop
        fake.refuse_spawns = None
        fake.tick(20.0)
        fake.bring_up("v1")
        assert plan.crash_loop is None
    finally:
        fake.close()


def test_each_workers_share_goes_in_one_message_and_one_message_answers_it(
        fake: FakePool) -> None:
    serving(fake)
    capacity = fake.supervisor.settings.capacity
    before = {w.name: w.messages for w in fake.workers_of("v1")}
    producer = fake.producer()
    for i in range(2 * capacity):
        producer.send(str(i).encode())
    fake.pump()
    for worker in fake.workers_of("v1"):
        held = worker.received()
        assert len(held) == capacity
        assert worker.messages == before[worker.name] + 1  # the whole share at once
        worker.answer_all(held)
    fake.pump()
    assert producer.codes() == {str(i).encode(): "ok" for i in range(2 * capacity)}
    assert fake.broker.inflight == 0


def test_a_worker_dying_after_answering_part_of_a_message_reruns_only_the_rest(
        fake: FakePool) -> None:
    serving(fake)
    capacity = fake.supervisor.settings.capacity
    producer = fake.producer()
    for i in range(capacity):
        producer.send(str(i).encode())
    fake.pump()
    victim, other = fake.workers_of("v1")
    held, held_elsewhere = victim.received(), other.received()
    assert len(held) == len(held_elsewhere) == capacity // 2  # each share in one message
    victim.answer_all(held[:1])  # one reply message for the first request, then death
    fake.pump()
    victim.exit(-9)
    fake.tick()
    rerun = other.received()
    assert len(rerun) == len(held) - 1  # only what got no reply runs again
    other.answer_all(rerun + held_elsewhere)
    fake.pump()
    assert producer.codes() == {str(i).encode(): "ok" for i in range(capacity)}


def test_a_late_reply_in_a_message_is_dropped_and_the_rest_of_it_delivered(
        fake: FakePool) -> None:
    serving(fake, workers=1)
    producer = fake.producer()
    producer.send(b"late", timeout_ms=100)
    fake.pump()
    [late] = fake.workers_of("v1")[0].received()
    producer.send(b"fresh")
    fake.pump()
    [worker] = fake.workers_of("v1")
    [fresh] = worker.received()
    worker.answer_all([late, late, fresh])  # a repeated seq must not answer twice
    fake.pump()
    assert producer.codes() == {b"late": "ok", b"fresh": "ok"}


@given(st.lists(st.integers(0, 300), max_size=6), st.integers(0, 2000))
def test_even_shares_split_as_one_at_a_time_to_the_most_credit(credits: list[int],
                                                               count: int) -> None:
    shares = even_shares(credits, count)
    left = list(credits)
    for _ in range(count):  # the reference: one request at a time
        best = max(range(len(left)), key=lambda i: left[i], default=None)
        if best is None or left[best] <= 0:
            break
        left[best] -= 1
    assert sum(shares) == sum(credits) - sum(left)
    assert all(0 <= share <= credit for share, credit in zip(shares, credits, strict=True))
    assert sorted(c - s for c, s in zip(credits, shares, strict=True)) == sorted(left)


def test_a_request_that_kills_every_worker_fails_after_the_attempt_limit(
        fake: FakePool) -> None:
    serving(fake)
    producer = fake.producer()
    producer.send(b"poison")
    fake.pump()
    for attempt in range(MAX_ATTEMPTS):
        holder = next(w for w in fake.workers_of("v1") if w.received())
        holder.exit(-9)
        fake.tick()
        codes = producer.codes()
        if attempt < MAX_ATTEMPTS - 1:
            assert codes == {}, f"answered after {attempt + 1} crash(es)"
            plan = fake.supervisor.plans["v1"]
            fake.tick(plan.backoff_until - fake.clock())
            fake.bring_up("v1")  # the replacement, after its backoff
    assert producer.codes() == {b"poison": protocol.WORKER_FAILED}
    assert f"{MAX_ATTEMPTS}x" in producer.replies[b"poison"][1]["message"]


def test_heartbeats_become_the_workers_batching_figures(fake: FakePool) -> None:
    serving(fake, workers=1)
    [worker] = fake.workers_of("v1")
    stats = BatchStats()
    stats.count_batch(requests=3, texts=6, unique_texts=5, items=3)
    worker.heartbeat(stats)
    fake.pump()
    [view] = fake.supervisor.worker_views()
    assert view.batching == stats


# -- the supervisor: health gate, hangs, stops, crash loops --------------------------------------


def test_a_failed_health_probe_fails_a_version_that_never_served(fake: FakePool) -> None:
    fake.load("v1", workers=1)
    fake.bring_up("v1", scores=[float("nan")] * 12)
    plan = fake.supervisor.plans["v1"]
    assert plan.failed is not None and "health check failed" in plan.failed
    assert fake.supervisor.failure("v1") == plan.failed
    producer = fake.producer()
    producer.send(b"r")
    fake.pump()
    assert producer.codes() == {b"r": protocol.WORKER_FAILED}


def test_a_silent_ready_worker_is_killed_and_replaced(fake: FakePool) -> None:
    serving(fake, workers=1)
    [worker] = fake.workers_of("v1")
    fake.tick(config.HEARTBEAT_S * config.HEARTBEAT_LIVENESS + 1)
    assert signal.SIGKILL in worker.signals
    fake.tick()
    assert fake.supervisor.plans["v1"].restarts == 1
    fake.tick(config.RESPAWN_BACKOFF_S[0])
    assert len(fake.workers_of("v1", LOADING)) == 1


def test_stop_escalates_to_sigterm_then_sigkill(fake: FakePool) -> None:
    serving(fake, workers=1)
    [worker] = fake.workers_of("v1")
    worker.ignores_term = True
    fake.supervisor.retire_version("v1")
    fake.tick()
    assert fake.state(worker) == STOPPING
    assert worker.received() == [] and worker.stop_received
    fake.tick(config.STOP_GRACE_S + 0.1)
    assert worker.signals == [signal.SIGTERM]
    fake.tick(config.TERM_GRACE_S + 0.1)
    assert worker.signals == [signal.SIGTERM, signal.SIGKILL]
    fake.tick()
    assert fake.supervisor.idle and "v1" not in fake.supervisor.plans


def test_a_draining_worker_finishes_what_it_holds_before_it_is_stopped(fake: FakePool) -> None:
    serving(fake, workers=1)
    [worker] = fake.workers_of("v1")
    producer = fake.producer()
    producer.send(b"r")
    fake.pump()
    [request] = worker.received()
    fake.supervisor.set_workers("v1", 0)
    fake.tick()
    assert fake.state(worker) == DRAINING and not worker.stop_received
    worker.answer(request)
    fake.tick()
    assert producer.codes() == {b"r": "ok"}
    assert worker.received() == [] and worker.stop_received
    assert fake.state(worker) == STOPPING


def test_a_crash_loop_is_reported_fails_fast_and_is_retried_until_it_serves(
        tmp_path: Path) -> None:
    fake = FakePool(tmp_path, crash_retry_s=20.0)
    try:
        serving(fake, workers=1)
        plan = fake.supervisor.plans["v1"]
        for _ in range(config.CRASH_LOOP_LIMIT):
            for worker in fake.workers_of("v1"):
                worker.exit(1)
            fake.tick()
            fake.tick(LOAD_REASON_WAIT_S)  # a worker dead while loading: its reason's wait
            if plan.crash_loop is None:
                fake.tick(plan.backoff_until - fake.clock())
                fake.tick()  # spawned; dies before it is ready
        assert plan.crash_loop is not None and "crash loop" in plan.crash_loop
        assert fake.supervisor.failure("v1") == plan.crash_loop
        producer = fake.producer()
        producer.send(b"r")
        fake.pump()
        assert producer.codes() == {b"r": protocol.WORKER_FAILED}  # at once, not queued
        assert fake.supervisor.next_try_s("v1") == pytest.approx(20.0, abs=0.2)
        fake.tick(10.0)
        assert not fake.workers_of("v1")  # waits for the retry
        fake.tick(10.0)
        fake.bring_up("v1")
        assert plan.crash_loop is None and fake.supervisor.failure("v1") is None
        producer.send(b"again")
        fake.pump()
        fake.serve_all()
        assert producer.codes()[b"again"] == "ok"
    finally:
        fake.close()


def test_every_worker_dying_at_once_is_one_crash_not_a_crash_loop(tmp_path: Path) -> None:
    """A killed forkserver takes every worker with it: the pool restarts them, and what they
    held runs again, rather than failing requests for a crash loop's minute."""
    workers = config.CRASH_LOOP_LIMIT + 3
    fake = FakePool(tmp_path, workers=workers)
    try:
        serving(fake, workers=workers)
        producer = fake.producer()
        for i in range(workers):
            producer.send(str(i).encode())
        fake.pump()
        for worker in fake.workers_of("v1"):
            worker.exit(255)
        fake.tick()
        plan = fake.supervisor.plans["v1"]
        assert plan.crash_loop is None and plan.restarts == 1
        assert f"and {workers - 1} more at once" in (plan.last_crash or "")
        for _ in range(20):
            fake.tick(1.0)
            fake.bring_up("v1")
            if len(fake.workers_of("v1", READY)) == workers:
                break
        while fake.serve_all():
            pass
        assert producer.codes() == {str(i).encode(): "ok" for i in range(workers)}
    finally:
        fake.close()


def test_a_stop_answers_what_a_worker_killed_at_its_end_held(fake: FakePool) -> None:
    """A worker busy past its stop grace is killed; what it held goes back to a queue that
    no worker will run: the pool answers it shutting_down before it exits."""
    from types import SimpleNamespace

    from pool.server import PoolServer

    serving(fake, workers=1)
    producer = fake.producer()
    for i in range(2):
        producer.send(f"r{i}".encode())
    fake.pump()
    [worker] = fake.workers_of("v1")
    assert len(worker.received()) == 2
    worker.ignores_term = True  # in a long pass: STOP and SIGTERM are not acted on in time
    server = SimpleNamespace(broker=fake.broker, supervisor=fake.supervisor,
                             settings=SimpleNamespace(shutdown_drain_s=30.0),
                             stopping_since=fake.clock(), _stop_reported=False)
    fake.broker.accepting = False
    fake.supervisor.begin_shutdown()
    for _ in range(2000):
        fake.clock.now += 0.1
        if worker.exitcode is None:
            worker.heartbeat(BatchStats())
        fake.pump()
        fake.supervisor.tick(fake.clock())
        if PoolServer._shutdown_step(server, fake.clock()):  # type: ignore[arg-type]
            break
    else:
        raise AssertionError("the stop never ended")
    assert worker.exitcode == -signal.SIGKILL
    assert producer.codes() == {b"r0": protocol.SHUTTING_DOWN, b"r1": protocol.SHUTTING_DOWN}


# -- lanes ------------------------------------------------------------------------------------


def test_an_unloaded_version_refuses_pinned_requests_and_fails_what_waits(
        fake: FakePool) -> None:
    serving(fake)
    fake.load("v2", "/models/v2", workers=1)
    fake.tick()  # v2 loading: pinned requests queue
    producer = fake.producer()
    producer.send(b"queued", version="v2")
    fake.pump()
    assert fake.broker.queue_length("v2") == 1
    fake.supervisor.retire_version("v2")
    producer.send(b"late", version="v2")
    fake.pump()
    codes = producer.codes()
    assert codes == {b"queued": protocol.UNKNOWN_VERSION, b"late": protocol.UNKNOWN_VERSION}
    fake.tick()
    fake.tick()  # the loading worker got SIGTERM (it reads no socket yet), then is reaped
    assert "v2" not in fake.supervisor.plans and "v2" not in fake.broker.lanes


# -- the rotation ------------------------------------------------------------------------------


def rotate(fake: FakePool, **kwargs: object) -> None:
    options: dict = {"workers": 2, "strategy": "surge", **kwargs}
    fake.rotations.start("v2", "/models/v2", **options)


def until_switched(fake: FakePool) -> None:
    """Bring v2 up until routing has moved to it (the rotation is draining v1)."""
    for _ in range(50):
        fake.bring_up("v2")
        fake.tick()
        if fake.rotations.current.phase == Phase.DRAINING:
            return
    raise AssertionError(f"still {fake.rotations.current.phase} after 50 rounds")


def run_rotation(fake: FakePool, limit: int = 400) -> list[Phase]:
    """Tick until the rotation ends, workers answering everything; the phases it went by."""
    phases = [fake.rotations.current.phase]
    for _ in range(limit):
        rot = fake.rotations.current
        if rot.finished or rot.phase == Phase.CANARY:
            break
        fake.bring_up("v2")
        fake.serve_all()
        fake.finish_stops()
        fake.tick()
        if rot.phase != phases[-1]:
            phases.append(rot.phase)
    return phases


def test_a_surge_rotation_goes_through_every_phase_and_fails_nothing(fake: FakePool) -> None:
    serving(fake)
    producer = fake.producer()
    for i in range(20):
        producer.send(f"before-{i}".encode())
    fake.pump()
    rotate(fake)
    phases = run_rotation(fake)
    for i in range(20):
        producer.send(f"after-{i}".encode())
    fake.pump()
    while fake.serve_all():
        pass
    rot = fake.rotations.current
    assert rot.outcome == "done", rot.reason
    assert list(rot.timings) == ["spawning", "loading", "health_check", "switching",
                                 "draining"]
    assert phases[0] == Phase.SPAWNING and phases[-1] == Phase.DONE
    assert set(producer.codes().values()) == {"ok"} and len(producer.replies) == 40
    versions = {body["version"] for rid, (_, body) in producer.replies.items()
                if rid.startswith(b"after")}
    assert versions == {"v2"}
    assert fake.broker.active == "v2" and "v1" not in fake.supervisor.plans
    assert set(fake.broker.lanes) == {"v2"}
    assert fake.registry.active == "v2"


def test_a_rolling_rotation_never_runs_more_workers_than_before(fake: FakePool) -> None:
    serving(fake)
    rotate(fake, strategy="rolling")
    peak = 0
    for _ in range(400):
        rot = fake.rotations.current
        if rot.finished:
            break
        alive = [w for w in fake.processes if w.exitcode is None]
        peak = max(peak, len(alive))
        fake.bring_up("v2")
        fake.serve_all()
        fake.finish_stops()
        fake.tick()
    assert rot.outcome == "done", rot.reason
    assert peak <= 2
    assert len(fake.workers_of("v2", READY)) == 2


@pytest.mark.parametrize("breakage", ["crash_on_load", "bad_probe", "operator"])
def test_a_rotation_that_fails_before_the_switch_rolls_back_and_v1_keeps_serving(
        fake: FakePool, breakage: str) -> None:
    serving(fake)
    rotate(fake)
    fake.tick()
    fake.tick()  # v2 workers spawned
    new = fake.workers_of("v2")
    assert len(new) == 2
    if breakage == "crash_on_load":
        new[0].exit(1)
    elif breakage == "bad_probe":
        fake.bring_up("v2", scores=[2.0] * 12)
    else:
        fake.rotations.rollback()
    for _ in range(50):
        fake.finish_stops()
        fake.tick()
    rot = fake.rotations.current
    assert rot.phase == Phase.FAILED and rot.outcome == "rolled_back"
    assert "rolling_back" in rot.timings and "switching" not in rot.timings
    assert fake.broker.active == "v1" and not fake.workers_of("v2")
    producer = fake.producer()
    producer.send(b"r")
    fake.pump()
    fake.serve_all()
    assert producer.codes() == {b"r": "ok"}
    assert producer.replies[b"r"][1]["version"] == "v1"


def fail_the_loading_worker_and_roll_back(fake: FakePool) -> None:
    """v2's loading worker dies; v1's workers come back until the rotation has rolled back."""
    fake.workers_of("v2", LOADING)[0].exit(1)
    for _ in range(100):
        fake.bring_up("v1")
        fake.finish_stops()
        fake.tick()
        if fake.rotations.current.finished:
            break
    assert fake.rotations.current.outcome == "rolled_back"


def test_a_failed_rolling_rotation_brings_the_old_workers_back(fake: FakePool) -> None:
    serving(fake)
    rotate(fake, strategy="rolling")
    for _ in range(20):
        fake.finish_stops()
        fake.tick()
        if fake.workers_of("v2", LOADING):
            break
    assert len(fake.workers_of("v1")) == 1  # one old worker made room
    fail_the_loading_worker_and_roll_back(fake)
    assert len(fake.workers_of("v1", READY)) == 2


def test_a_canary_shares_traffic_then_promote_finishes_it(fake: FakePool) -> None:
    serving(fake)
    rotate(fake, canary=50.0)
    assert run_rotation(fake)[-1] == Phase.CANARY
    assert fake.broker.active == "v1" and fake.broker.canary == ("v2", 0.5)
    producer = fake.producer()
    for i in range(100):  # within the queue bound
        producer.send(str(i).encode())
    fake.pump()
    while fake.serve_all():
        pass
    served_by = [body["version"] for _, body in producer.collect().values()]
    assert len(served_by) == 100
    assert 20 < served_by.count("v2") < 80
    fake.rotations.promote()
    run_rotation(fake)
    assert fake.rotations.current.outcome == "done"
    assert fake.broker.active == "v2" and fake.broker.canary is None


def test_ending_a_canary_returns_all_traffic_to_v1(fake: FakePool) -> None:
    serving(fake)
    rotate(fake, canary=10.0)
    run_rotation(fake)
    fake.rotations.rollback()
    producer = fake.producer()
    producer.send(b"pinned", version="v2")
    fake.pump()
    assert producer.codes() == {b"pinned": protocol.UNKNOWN_VERSION}  # its lane is closed
    for _ in range(20):
        fake.finish_stops()
        fake.tick()
    rot = fake.rotations.current
    assert rot.outcome == "rolled_back"
    assert fake.broker.active == "v1" and fake.broker.canary is None
    assert "v2" not in fake.broker.lanes


def test_v2_failing_while_v1_is_still_loaded_switches_back_to_v1(fake: FakePool) -> None:
    serving(fake)
    rotate(fake)
    until_switched(fake)
    producer = fake.producer()
    producer.send(b"pinned-v1", version="v1")  # keeps the drain from closing v1 at once
    fake.pump()
    fake.supervisor.plans["v2"].failed = "simulated"
    fake.tick()
    rot = fake.rotations.current
    assert rot.switched_back and rot.phase == Phase.ROLLING_BACK
    assert "v2 failed after the switch: simulated" in (rot.reason or "")
    assert fake.broker.active == "v1" and fake.registry.active == "v1"
    producer.send(b"after")
    fake.pump()
    fake.serve_all()
    assert producer.codes() == {b"pinned-v1": "ok", b"after": "ok"}
    assert producer.replies[b"after"][1]["version"] == "v1"


def test_v2_failing_once_v1_has_gone_ends_the_rotation_as_failed(fake: FakePool) -> None:
    serving(fake)
    rotate(fake)
    until_switched(fake)
    rot = fake.rotations.current
    for _ in range(50):  # v1 drains and retires
        fake.finish_stops()
        fake.tick()
        if rot.source_retired:
            break
    fake.supervisor.plans["v2"].failed = "simulated"
    fake.tick()
    assert rot.phase == Phase.FAILED and rot.outcome == "failed"
    assert "v2 failed after the switch" in (rot.reason or "")
    assert fake.broker.active == "v2"


def test_a_new_worker_crashing_while_another_is_ready_rolls_the_rotation_back(
        fake: FakePool) -> None:
    """One of v2's workers passes its check, the other dies loading (its device out of
    memory): v2 has served once, so the supervisor would retry it for ever; the rotation
    does not wait for it."""
    serving(fake)
    rotate(fake)
    fake.tick()
    fake.tick()
    first, second = fake.workers_of("v2")
    first.announce()
    fake.pump()
    for request in first.received():
        first.answer(request)
    fake.pump()
    fake.tick()
    assert fake.state(first) == READY
    second.exit(1)
    for _ in range(50):
        fake.finish_stops()
        fake.tick()
    rot = fake.rotations.current
    assert rot.outcome == "rolled_back", rot.phase
    assert "exited with code 1" in (rot.reason or "")
    assert fake.broker.active == "v1" and not fake.workers_of("v2")
    fake.rotations.start("v3", "/models/v3", workers=2, strategy="surge")  # not "still ..."


def test_a_rolling_rotation_whose_next_worker_crashes_goes_back_to_v1(serving3: FakePool) -> None:
    fake = serving3
    rotate(fake, strategy="rolling", workers=3)
    rot = fake.rotations.current
    for _ in range(100):  # the first v2 worker serves
        fake.bring_up("v2")
        fake.finish_stops()
        fake.tick()
        if rot.phase == Phase.DRAINING:
            break
    for _ in range(100):  # another v1 worker makes room for the second v2 worker
        fake.finish_stops()
        fake.tick()
        if fake.workers_of("v2", LOADING):
            break
    assert len(fake.workers_of("v2", READY)) == 1
    assert len(fake.workers_of("v1", READY)) == 1
    fake.workers_of("v2", LOADING)[0].exit(1)
    for _ in range(2):  # its exit, then the reason it may still send
        fake.tick(LOAD_REASON_WAIT_S)
    assert rot.switched_back and fake.broker.active == "v1"
    for _ in range(100):
        fake.bring_up("v1")
        fake.finish_stops()
        fake.tick()
        if rot.finished:
            break
    assert rot.outcome == "rolled_back"
    assert len(fake.workers_of("v1", READY)) == 3 and not fake.workers_of("v2")


def test_a_rolling_rotation_to_fewer_workers_keeps_the_old_ones_until_the_new_serve(
        serving3: FakePool) -> None:
    fake = serving3
    rotate(fake, strategy="rolling", workers=1)
    rot = fake.rotations.current
    fewest_v1 = 3
    for _ in range(100):
        fake.bring_up("v2")
        fake.finish_stops()
        fake.tick()
        if rot.phase != Phase.DRAINING:
            fewest_v1 = min(fewest_v1, len(fake.workers_of("v1", READY)))
        else:
            break
    assert fewest_v1 == 2, "one old worker made room, the others served meanwhile"
    assert fake.broker.active == "v2"


def test_a_failed_rolling_rotation_restores_as_many_old_workers_as_there_were(
        serving3: FakePool) -> None:
    fake = serving3
    rotate(fake, strategy="rolling", workers=1)
    for _ in range(20):
        fake.finish_stops()
        fake.tick()
        if fake.workers_of("v2", LOADING):
            break
    fail_the_loading_worker_and_roll_back(fake)
    assert len(fake.workers_of("v1", READY)) == 3


def test_a_canary_whose_workers_all_fail_returns_its_traffic_to_v1(fake: FakePool) -> None:
    serving(fake)
    rotate(fake, canary=50.0)
    assert run_rotation(fake)[-1] == Phase.CANARY
    for _ in range(40):  # v2 crash-loops: every worker of it dies
        for worker in fake.workers_of("v2"):
            worker.exit(-9)
        fake.tick(0.5)
    rot = fake.rotations.current
    assert rot.phase in (Phase.ROLLING_BACK, Phase.FAILED) and rot.outcome in (None,
                                                                               "rolled_back")
    assert "failed after the switch" in (rot.reason or "")
    assert fake.broker.active == "v1" and fake.broker.canary is None
    producer = fake.producer()
    for i in range(10):
        producer.send(str(i).encode())
    fake.pump()
    while fake.serve_all():
        pass
    assert set(producer.codes().values()) == {"ok"} and len(producer.replies) == 10


def test_the_drain_waits_for_a_quiet_period_of_pinned_requests(fake: FakePool) -> None:
    serving(fake)
    rotate(fake)
    until_switched(fake)
    rot = fake.rotations.current
    producer = fake.producer()
    quiet = config.DRAIN_QUIET_S
    for i in range(5):  # a producer pinned to v1, a request every half quiet period
        producer.send(f"p{i}".encode(), version="v1")
        fake.pump()
        fake.serve_all()
        fake.tick(quiet / 2)
        assert rot.source_closed_at is None, f"v1 closed while request {i} was recent"
    fake.tick(quiet)
    fake.tick()
    assert rot.source_closed_at is not None
    assert producer.codes() == {f"p{i}".encode(): "ok" for i in range(5)}
    producer.send(b"too-late", version="v1")
    fake.pump()
    assert producer.codes()[b"too-late"] == protocol.UNKNOWN_VERSION


def test_the_drain_closes_v1_at_its_timeout_under_endless_pinned_traffic(
        fake: FakePool) -> None:
    serving(fake)
    rotate(fake, drain_timeout_s=3.0)
    until_switched(fake)
    rot = fake.rotations.current
    drain_started = rot.phase_since
    producer = fake.producer()
    for i in range(40):
        producer.send(f"p{i}".encode(), version="v1")
        fake.pump()
        fake.serve_all()
        fake.finish_stops()
        fake.tick(0.1)
    assert rot.source_closed_at is not None
    assert rot.source_closed_at - drain_started == pytest.approx(3.0, abs=0.3)
    for _ in range(20):
        fake.finish_stops()
        fake.tick()
    assert rot.outcome == "done"
    assert set(producer.codes().values()) <= {"ok", protocol.UNKNOWN_VERSION}


def test_unpinned_requests_queued_for_v1_move_to_v2_at_the_switch(fake: FakePool) -> None:
    serving(fake, workers=1)
    capacity = fake.supervisor.settings.capacity
    producer = fake.producer()
    for i in range(capacity + 3):
        producer.send(str(i).encode())
    fake.pump()
    assert fake.broker.queue_length("v1") == 3
    rotate(fake, workers=1)
    until_switched(fake)
    assert fake.broker.queue_length("v1") == 0
    while fake.serve_all():
        pass
    versions = [body["version"] for _, body in producer.collect().values()]
    assert versions.count("v2") == 3 and len(versions) == capacity + 3


def test_refused_rotations_leave_everything_as_it_was(fake: FakePool) -> None:
    from pool.rotation import RotationError

    serving(fake)
    with pytest.raises(RotationError, match="already the active"):
        fake.rotations.start("v1", "/models/v1", workers=2)
    with pytest.raises(RotationError, match="canary"):
        fake.rotations.start("v2", "/models/v2", workers=2, strategy="rolling", canary=5.0)
    with pytest.raises(RotationError, match="unknown strategy"):
        fake.rotations.start("v2", "/models/v2", workers=2, strategy="sideways")
    rotate(fake)
    with pytest.raises(RotationError, match="still"):
        rotate(fake)
    assert set(fake.broker.lanes) == {"v1"} and fake.broker.active == "v1"


def test_an_old_worker_dying_during_the_drain_loses_none_of_its_requests(
        fake: FakePool) -> None:
    serving(fake)
    capacity = fake.supervisor.settings.capacity
    producer = fake.producer()
    for i in range(2 * capacity):
        producer.send(str(i).encode())
    fake.pump()
    old = fake.workers_of("v1")
    held = {w.name: w.received() for w in old}
    assert all(len(x) == capacity for x in held.values())
    rotate(fake)
    until_switched(fake)
    assert {fake.state(w) for w in old} == {READY}  # v1 serves pinned requests until idle
    old[0].exit(-9)  # dies holding unpinned requests
    fake.tick()
    for request in held[old[1].name]:
        old[1].answer(request)
    for _ in range(20):
        fake.serve_all()
        fake.finish_stops()
        fake.tick()
    assert producer.codes() == {str(i).encode(): "ok" for i in range(2 * capacity)}
    assert fake.rotations.current.outcome == "done"


# -- the quality gate --------------------------------------------------------------------------

GATE_LABELS = [2, 2, 1, 1, 0, 0]
GOOD_SCORES = [0.95, 0.9, 0.7, 0.6, 0.3, 0.1]  # Spearman 0.956 against GATE_LABELS


def a_gate(min_spearman: float = 0.5, max_drop: float = 0.05) -> QualityGate:
    pairs = tuple(LabelledPair(label, f"a{i}", f"b{i}", i + 1)
                  for i, label in enumerate(GATE_LABELS))
    return QualityGate("gate.tsv", pairs, min_spearman, max_drop)


def answer_gate(fake: FakePool, version: str, scores: list[float] | None) -> int:
    """Ready workers of `version` answer the gate's probe with `scores` (None: they never
    do); anything else they hold as usual. How many gate probes there were."""
    probes = 0
    for worker in fake.workers_of(version, READY):
        for request in worker.received():
            is_gate = len(request.body.get("pairs", [])) == len(GATE_LABELS)
            probes += is_gate
            if not is_gate:
                worker.answer(request)
            elif scores is not None:
                worker.answer(request, scores)
    fake.pump()
    return probes


def until_gate_sent(fake: FakePool, target: str) -> None:
    """Bring the rotation's new version up until its gate probes are out."""
    for _ in range(20):
        fake.bring_up(target)
        fake.tick()
        if fake.rotations.current.gate_sent_at is not None:
            return
    raise AssertionError(f"no gate probe sent; the rotation is {fake.rotations.current.phase}")


def gated_rotation(fake: FakePool, new_scores: list[float], **gate: float) -> Rotation:
    """v1 serving, a rotation to v2 behind a gate, v2 up; both answer the gate's probe."""
    serving(fake)
    rotate(fake, gate=a_gate(**gate))
    until_gate_sent(fake, "v2")
    assert answer_gate(fake, "v2", new_scores) == 1
    assert answer_gate(fake, "v1", GOOD_SCORES) == 1
    fake.tick()
    return fake.rotations.current


def test_a_rotation_whose_new_version_passes_the_quality_gate_switches(fake: FakePool) -> None:
    rot = gated_rotation(fake, GOOD_SCORES)
    assert rot.quality is not None and rot.quality.passed
    assert rot.quality.spearman == rot.quality.active_spearman == pytest.approx(0.9562, abs=1e-3)
    run_rotation(fake)
    assert rot.outcome == "done"
    history = [e for e in fake.registry.data["history"] if e["event"] == "quality_gate"]
    assert history[-1]["passed"] and history[-1]["eval"] == "gate.tsv"
    assert rot.as_dict(0)["quality"]["spearman"] == rot.quality.spearman


@pytest.mark.parametrize(("new_scores", "gate", "why"), [
    (GOOD_SCORES[::-1], {}, "is below the floor 0.5"),
    ([0.95, 0.6, 0.7, 0.9, 0.3, 0.1], {"min_spearman": 0.0, "max_drop": 0.05},
     "more than 0.05 below the active version's 0.956"),
])
def test_a_new_version_that_scores_too_low_is_rolled_back_with_the_figures(
        fake: FakePool, new_scores: list[float], gate: dict, why: str) -> None:
    rot = gated_rotation(fake, new_scores, **gate)
    assert rot.quality is not None and not rot.quality.passed
    assert rot.phase == Phase.ROLLING_BACK and why in (rot.reason or "")
    assert "gate.tsv" in rot.reason
    for _ in range(50):
        fake.finish_stops()
        fake.tick()
    assert rot.outcome == "rolled_back" and fake.broker.active == "v1"
    assert fake.registry.data["history"][-1]["quality"]["passed"] is False


def test_the_gate_ranks_scores_above_float_noise() -> None:
    """One model's scores from two passes of other widths differ by ~1e-7: identical texts
    score 1.0 give or take, and whether two of them tie must not move the Spearman."""
    gate = a_gate()
    one_pass = [1.0, 1.0, 0.7, 0.6, 0.3, 0.1]
    other_pass = [0.99999994, 1.00000012, 0.70000003, 0.6, 0.29999998, 0.1]
    result = gate.judge(other_pass, one_pass)
    assert result.spearman == result.active_spearman and result.passed


def test_a_new_version_answering_nan_fails_its_gate_and_the_pool_serves_on(
        fake: FakePool) -> None:
    """orjson writes a NaN as null: the gate's verdict, not an exception in the serve loop."""
    rot = gated_rotation(fake, [*GOOD_SCORES[:-1], float("nan")])
    while not rot.finished:
        fake.finish_stops()
        fake.tick()
    assert rot.outcome == "rolled_back"
    assert "not a finite number" in (rot.reason or "")
    producer = fake.producer()
    producer.send(b"after")
    fake.pump()
    fake.serve_all()
    assert producer.codes() == {b"after": "ok"}


def test_a_new_worker_dying_on_a_gate_probe_rolls_the_rotation_back(fake: FakePool) -> None:
    serving(fake)
    rotate(fake, gate=a_gate())
    until_gate_sent(fake, "v2")
    answer_gate(fake, "v1", GOOD_SCORES)
    prober = next(w for w in fake.workers_of("v2", READY)
                  if w.name.encode() == fake.rotations.current.gate_runs["new"].worker)
    prober.exit(1)  # dies holding the probe: the broker answers it worker_failed
    rot = fake.rotations.current
    for _ in range(20):
        fake.finish_stops()
        fake.tick()
        if rot.finished:
            break
    assert rot.outcome == "rolled_back" and rot.quality is None
    assert "worker exited with code 1" in (rot.reason or "")
    assert fake.broker.active == "v1"


def rotate_on_to_v3(fake: FakePool, gate: QualityGate, v2_scores: list[float]) -> int:
    """After gated_rotation and its end: a rotation v2 -> v3 behind `gate`; v3 answers with
    GOOD_SCORES, v2 with `v2_scores`. How many gate probes v2 got."""
    fake.rotations.start("v3", "/models/v3", workers=2, strategy="surge", gate=gate)
    until_gate_sent(fake, "v3")
    assert answer_gate(fake, "v3", GOOD_SCORES) == 1
    probes = answer_gate(fake, "v2", v2_scores)
    fake.tick()
    return probes


def test_a_version_that_passed_a_gate_is_not_scored_on_the_same_set_again(
        fake: FakePool) -> None:
    # v2's own Spearman (0.717) differs from v1's (0.956): whose the second gate uses shows.
    first = gated_rotation(fake, [0.95, 0.6, 0.7, 0.9, 0.3, 0.1], max_drop=1.0)
    run_rotation(fake)
    assert first.outcome == "done" and first.quality is not None
    assert rotate_on_to_v3(fake, a_gate(), GOOD_SCORES) == 0
    rot = fake.rotations.current
    assert rot.quality is not None and rot.quality.active_spearman == first.quality.spearman
    assert rot.gate_active_known == first.quality.spearman
    assert rot.quality.as_dict()["active_from"] == "history"


def test_an_edited_set_is_scored_by_the_active_version_again(fake: FakePool) -> None:
    first = gated_rotation(fake, GOOD_SCORES)
    run_rotation(fake)
    assert first.outcome == "done"
    pairs = a_gate().pairs
    edited = QualityGate("gate.tsv", (*pairs[:-1], replace(pairs[-1], text_b="edited")))
    assert edited.digest != a_gate().digest
    assert rotate_on_to_v3(fake, edited, GOOD_SCORES) == 1
    rot = fake.rotations.current
    assert rot.quality is not None and rot.gate_active_known is None
    assert rot.quality.active_spearman == pytest.approx(0.9562, abs=1e-3)


def a_big_gate(pairs: int, max_request_pairs: int) -> QualityGate:
    """`pairs` labelled pairs q{i} / r{i}, labels 0, 1, 2 in turn."""
    labelled = tuple(LabelledPair(i % 3, f"q{i}", f"r{i}", i + 1) for i in range(pairs))
    return QualityGate("big.tsv", labelled, max_request_pairs=max_request_pairs)


def ranked_score(pair: list[str]) -> float:
    """A score that ranks pair i by its label, then by i."""
    i = int(pair[0][1:])
    return (i % 3) / 2 + i / 1000


def score_the_big_gate(fake: FakePool, fault: str = "", at: int = 0, faulty: str = "v1",
                       ) -> tuple[Rotation, dict[str, list[int]]]:
    """Bring v2 up and answer every gate probe until the gate is judged (or for 60 rounds):
    the rotation, and the size of each probe each version got, in order. Version `faulty`'s
    probe number `at` gets `fault`: "error" (an error reply) or "silent" (none). Asserts
    that a version never holds two gate probes at once."""
    rot = fake.rotations.current
    sizes: dict[str, list[int]] = {"v1": [], "v2": []}
    for _ in range(60):
        fake.bring_up("v2")
        for version in sizes:
            for worker in fake.workers_of(version, READY):
                held = worker.received()
                probes = [r for r in held if r.body["pairs"][0][0].startswith("q")]
                assert len(probes) <= 1, f"{version} holds {len(probes)} gate probes at once"
                for request in held:
                    if request not in probes:
                        worker.answer(request)
                        continue
                    this = fault if version == faulty and len(sizes[version]) == at else ""
                    sizes[version].append(len(request.body["pairs"]))
                    if this == "error":
                        worker.answer(request, error=protocol.INTERNAL)
                    elif not this:
                        worker.answer(request, [ranked_score(p) for p in request.body["pairs"]])
        fake.pump()
        fake.tick()
        if rot.quality is not None:
            break
    return rot, sizes


def test_a_gate_set_of_any_size_is_scored_one_probe_at_a_time(fake: FakePool) -> None:
    """Over --max-pairs is no refusal: the new version gets requests as large as the pool
    takes; the serving one 16 pairs at a time, so that no pass of its stalls its traffic."""
    serving(fake)
    gate = a_big_gate(40, max_request_pairs=25)
    rotate(fake, gate=gate)
    rot, sizes = score_the_big_gate(fake)
    assert sizes == {"v2": [25, 15], "v1": [16, 16, 8]}
    whole = gate.judge([ranked_score([p.text_a]) for p in gate.pairs], None)
    assert rot.quality is not None and rot.quality.passed
    assert rot.quality.spearman == rot.quality.active_spearman == whole.spearman
    assert rot.quality.as_dict()["active_from"] == "scored"
    assert rot.quality.pairs == 40


def test_an_active_version_that_fails_a_gate_probe_leaves_the_floor_to_judge(
        fake: FakePool) -> None:
    serving(fake)
    rotate(fake, gate=a_big_gate(40, max_request_pairs=25))
    rot, sizes = score_the_big_gate(fake, "error", at=1)
    assert sizes["v1"] == [16, 16]  # nothing sent after the failed one
    assert rot.quality is not None and rot.quality.passed
    assert rot.quality.spearman is not None and rot.quality.active_spearman is None


def test_a_new_version_failing_a_probe_is_judged_at_once_and_the_active_one_stops(
        fake: FakePool) -> None:
    serving(fake)
    rotate(fake, gate=a_big_gate(40, max_request_pairs=25))
    rot, sizes = score_the_big_gate(fake, "error", at=0, faulty="v2")
    assert sizes["v2"] == [25]
    assert rot.quality is not None and not rot.quality.passed
    assert "the new version could not score big.tsv: internal" in (rot.quality.reason or "")
    for _ in range(20):  # what v1 still holds is answered; no probe follows it
        fake.serve_all()
        fake.finish_stops()
        fake.tick()
    assert rot.outcome == "rolled_back"
    assert rot.gate_runs["active"].answered < 3, "the active version scored the whole set"


def test_a_gate_probe_left_unanswered_ends_the_gate_after_its_timeout(fake: FakePool) -> None:
    serving(fake)
    rotate(fake, gate=a_big_gate(40, max_request_pairs=25))
    rot, sizes = score_the_big_gate(fake, "silent", at=1)
    assert rot.quality is None and sizes == {"v2": [25, 15], "v1": [16, 16]}
    overdue_at = rot.gate_runs["active"].progressed_at + QUALITY_TIMEOUT_S
    while fake.clock() < overdue_at - 1:  # workers alive all along: only the probe is late
        for worker in fake.workers_of("v1", READY) + fake.workers_of("v2", READY):
            worker.heartbeat(BatchStats())
        fake.pump()
        fake.tick(min(5.0, overdue_at - 1 - fake.clock()))
    assert rot.quality is None  # a probe's time counts from when it was sent
    fake.tick(2)
    assert rot.quality is not None and rot.quality.passed
    assert rot.quality.active_spearman is None


# -- why a rotation failed ---------------------------------------------------------------------


def test_a_worker_that_cannot_load_its_model_says_why_and_the_rotation_says_it_too(
        fake: FakePool) -> None:
    serving(fake)
    rotate(fake)
    fake.tick()
    fake.tick()  # v2 workers spawned, loading
    why = "SafetensorError: Error while deserializing header: invalid header length (/models/v2)"
    worker = fake.workers_of("v2", LOADING)[0]
    worker.exit(1)  # its exit is seen before its reason (sent first, read later): the
    fake.tick()     # reaping waits for it
    assert fake.supervisor.workers.get(worker.name.encode()) is not None
    worker.sock.send_multipart([protocol.W_FAILED, why.encode()])
    fake.pump()
    fake.tick()
    rot = fake.rotations.current
    assert rot.phase in (Phase.ROLLING_BACK, Phase.FAILED)
    assert rot.reason == f"worker exited with code 1 while loading: {why}"
    assert fake.supervisor.failure("v2") == rot.reason


def test_a_version_whose_embeddings_change_size_is_refused_unless_allowed(
        fake: FakePool) -> None:
    serving(fake)
    rotate(fake)
    for _ in range(5):
        fake.tick()
        for worker in fake.workers_of("v2", LOADING):
            worker.dim = 16  # v1's workers answer 8-dimensional embeddings
            worker.announce()
        fake.pump()
        for worker in fake.workers_of("v2", CHECKING):
            for request in worker.received():
                worker.answer(request)
        fake.pump()
    fake.tick()
    rot = fake.rotations.current
    assert rot.phase == Phase.ROLLING_BACK and "16-dimensional embeddings where v1" in rot.reason
    for _ in range(30):
        fake.finish_stops()
        fake.tick()
    rotate(fake, allow_dim_change=True)
    assert run_rotation(fake)[-1] == Phase.DONE


def test_a_ping_names_every_version_taking_requests_with_its_ready_workers(
        fake: FakePool) -> None:
    serving(fake)
    fake.load("v2", path="/models/v2", workers=1)  # loaded beside v1: pinned traffic only
    fake.bring_up("v2")
    producer = fake.producer()
    producer.sock.send_multipart([protocol.PROTOCOL, b"p", protocol.OP_PING, b"", b"{}"])
    fake.pump()
    status, body = producer.collect()[b"p"]
    assert status == protocol.STATUS_OK
    assert body == {"version": "v1", "workers": 2, "versions": {"v1": 2, "v2": 1}}


# -- the bake: the old version stays loaded while the new one is judged -----------------------


def traffic_for(fake: FakePool, producer, seconds: float, prefix: str,
                fail_every: int = 0) -> None:
    """`seconds` of traffic, ten requests a (fake) second, every one answered by whoever holds
    it; with `fail_every`, v2 fails every n-th request it answers (an internal error)."""
    for sent in range(int(seconds * 10)):
        producer.send(f"{prefix}-{sent}".encode())
        fake.pump()
        for worker in [w for w in fake.processes if w.exitcode is None]:
            for request in worker.received():
                failing = fail_every and worker.cfg.version == "v2" and \
                    int(request.seq.hex(), 16) % fail_every == 0
                worker.answer(request, error=protocol.INTERNAL if failing else None)
        fake.pump()
        fake.finish_stops()
        fake.tick()


def baked_rotation(fake: FakePool, bake_s: float = 5.0, baseline_s: float = 10.0,
                   **limits: float) -> Rotation:
    serving(fake)
    producer = fake.producer()
    traffic_for(fake, producer, baseline_s, "before")  # the old version's baseline
    rotate(fake, bake_s=bake_s, bake_limits=BakeLimits(**limits))
    for _ in range(50):
        fake.bring_up("v2")
        fake.tick()
        if fake.rotations.current.phase == Phase.BAKING:
            return fake.rotations.current
    raise AssertionError(f"still {fake.rotations.current.phase}")


def test_a_clean_bake_keeps_v1_loaded_then_drains_it(fake: FakePool) -> None:
    rot = baked_rotation(fake, bake_s=5.0)
    v1_workers = fake.workers_of("v1", READY)
    producer = fake.producer()
    traffic_for(fake, producer, 3, "baking")
    assert rot.phase == Phase.BAKING
    assert fake.workers_of("v1", READY) == v1_workers  # still loaded, nothing stopped
    assert {body["version"] for _, body in producer.collect().values()} == {"v2"}
    traffic_for(fake, producer, 4, "late")
    while not rot.finished:
        fake.serve_all()
        fake.finish_stops()
        fake.tick()
    assert rot.outcome == "done", rot.reason
    assert list(rot.timings) == ["spawning", "loading", "health_check", "switching", "baking",
                                 "draining"]
    assert rot.timings["baking"] >= 5.0
    assert not rot.bake_verdict.regressed and rot.bake_verdict.candidate.requests >= 40
    assert rot.bake_verdict.baseline.requests >= 90
    assert set(producer.codes().values()) == {"ok"}
    assert "baked" in [event["event"] for event in fake.registry.data["history"]]


def test_a_bake_switches_back_at_once_when_v2_fails_requests(fake: FakePool) -> None:
    rot = baked_rotation(fake, bake_s=60.0, max_error_rate=0.01)
    v1_workers = fake.workers_of("v1", READY)
    producer = fake.producer()
    traffic_for(fake, producer, 10, "baking", fail_every=10)
    assert rot.phase in (Phase.ROLLING_BACK, Phase.FAILED)
    assert rot.outcome in (None, "rolled_back") and "bake:" in rot.reason
    assert "v2 failed" in rot.reason
    assert fake.broker.active == "v1" and fake.registry.active == "v1"
    assert fake.workers_of("v1", READY) == v1_workers  # the same processes serve again
    assert rot.timings["baking"] < 10  # judged as soon as the errors were enough
    codes = producer.codes()
    failed = [rid for rid, code in codes.items() if code != "ok"]
    # Only the bake window's requests failed, about one in ten of those v2 answered.
    assert 0 < len(failed) <= len(codes) // 5
    after = fake.producer()
    traffic_for(fake, after, 3, "after")
    while not rot.finished:
        fake.serve_all()
        fake.finish_stops()
        fake.tick()
    assert rot.outcome == "rolled_back"
    assert set(after.codes().values()) == {"ok"}
    assert {body["version"] for _, body in after.collect().values()} == {"v1"}
    assert "v2" not in fake.supervisor.plans or fake.supervisor.plans["v2"].retired


def test_a_bake_counts_nothing_from_before_its_switch(fake: FakePool) -> None:
    """A canary's failures in its last second, promoted into a bake: the bake judges v2's
    replies from the switch on, not from the last once-a-second record before it."""
    serving(fake)
    producer = fake.producer()
    traffic_for(fake, producer, 10, "before")  # v1's baseline
    rotate(fake, canary=50.0, bake_s=60.0, bake_limits=BakeLimits(max_error_rate=0.01))
    assert run_rotation(fake)[-1] == Phase.CANARY
    while fake.clock() != fake._recorded_at:  # just recorded: the next record is 1 s away
        fake.tick()
    canary = fake.producer()
    traffic_for(fake, canary, 0.9, "canary", fail_every=1)  # every v2 answer an error
    assert "internal" in canary.codes().values()
    fake.rotations.promote()
    rot = fake.rotations.current
    assert rot.phase == Phase.BAKING
    traffic_for(fake, producer, 3, "baking")
    assert rot.phase == Phase.BAKING, rot.reason
    assert rot.bake_verdict.candidate.errors == 0
    assert rot.bake_verdict.candidate.requests >= 20  # of 30, up to a second unrecorded


def bake_with_slow_v2(fake: FakePool, rot: Rotation, per_tick: int, ticks: int,
                      held_ticks: Callable[[int], int],
                      until: Callable[[], bool] = lambda: False) -> Producer:
    """`per_tick` requests every 0.1 s; v2 holds each request that reaches it at tick i for
    held_ticks(i) ticks before answering; until the bake ends, `until()` or `ticks`."""
    producer = fake.producer()
    held: list = []
    for i in range(ticks):
        for k in range(per_tick):
            producer.send(f"r-{i}-{k}".encode())
        fake.pump()
        for worker in fake.workers_of("v2"):
            held += [(worker, request, i + held_ticks(i)) for request in worker.received()]
        for worker, request, _ in [h for h in held if h[2] <= i]:
            worker.answer(request)
        held = [h for h in held if h[2] > i]
        fake.pump()
        fake.tick()
        if rot.phase != Phase.BAKING or until():
            break
    return producer


def test_a_bake_judges_latency_against_v1s(fake: FakePool) -> None:
    # v1 answers at once; v2 holds every request for 0.2 s (two ticks) before answering;
    # 30 requests a second: p99 is judged over 200 replies after the bake's first 2 s.
    rot = baked_rotation(fake, bake_s=60.0, baseline_s=25.0, max_p99_ratio=1.5)
    bake_with_slow_v2(fake, rot, per_tick=3, ticks=150, held_ticks=lambda i: 2)
    assert rot.switched_back, rot.phase
    assert "p99" in rot.reason and fake.broker.active == "v1"


def test_a_bake_leaves_its_first_seconds_out_of_the_p99(fake: FakePool) -> None:
    """v2's first passes are slow (on a GPU: plans for new shapes), then it is as fast as
    v1: the settle keeps them out of the p99, so the bake goes on; its errors would count."""
    rot = baked_rotation(fake, bake_s=60.0, baseline_s=25.0, max_p99_ratio=1.5)

    def whole() -> Traffic:  # every v2 reply since the switch
        return fake.recent.traffic("v2", rot.phase_since)

    def judged_p99() -> bool:  # the settled replies are enough for a p99
        verdict = rot.bake_verdict
        return verdict is not None and verdict.candidate.latency_replies >= 1000

    # 0.3 s each in the bake's first half second, then none; 40 requests a second.
    producer = bake_with_slow_v2(fake, rot, per_tick=4, ticks=400,
                                 held_ticks=lambda i: 3 if i < 5 else 0, until=judged_p99)
    assert judged_p99()
    # Judged over all its replies, the slow first half second alone is a regression.
    assert judge(rot.bake_baseline, whole(), rot.bake_limits).regressed
    assert rot.phase == Phase.BAKING and not rot.bake_verdict.regressed, rot.reason
    assert rot.bake_verdict.candidate.latency_over < rot.bake_verdict.candidate.requests
    assert set(producer.codes().values()) == {"ok"}


def test_an_operator_ends_a_bake_by_switching_back(fake: FakePool) -> None:
    rot = baked_rotation(fake)
    fake.rotations.rollback()
    assert rot.switched_back and fake.broker.active == "v1"
    while not rot.finished:
        fake.serve_all()
        fake.finish_stops()
        fake.tick()
    assert rot.outcome == "rolled_back" and rot.reason == "rolled back by operator"


def test_a_switch_back_leaves_the_registry_as_before_the_switch(fake: FakePool) -> None:
    """`pool rollback` after a bake that switched back must not go to the rejected v2."""
    for name in ("v0", "v1"):
        fake.registry.put_version(name, f"/models/{name}")
        fake.registry.set_active(name)
    rot = baked_rotation(fake)
    assert fake.registry.data["previous"] == "v1"
    fake.rotations.rollback()
    assert rot.switched_back
    assert (fake.registry.active, fake.registry.data["previous"]) == ("v1", "v0")
    assert fake.rotations.rollback() is rot, "a rollback under way is one already asked for"


def test_a_bake_needs_both_versions_loaded(fake: FakePool) -> None:
    serving(fake)
    with pytest.raises(RotationError, match="bake keeps the old version loaded"):
        rotate(fake, strategy="rolling", bake_s=10.0)
    with pytest.raises(RotationError, match="above 0"):
        rotate(fake, bake_s=0.0)
    assert fake.rotations.current is None


def test_the_judge_lets_a_single_early_error_pass_and_says_why_it_fails() -> None:
    limits = BakeLimits(max_error_rate=0.01, max_p99_ratio=1.5)
    before = Traffic(requests=1000, errors=0, p99_ms=10.0)
    assert not judge(before, Traffic(requests=5, errors=0), limits).regressed
    assert not judge(before, Traffic(requests=3, errors=1, p99_ms=9.0), limits).regressed
    failing = judge(before, Traffic(requests=60, errors=6, p99_ms=9.0), limits)
    assert failing.regressed and "failed 6 of 60 requests (10.0%)" in failing.reason
    # Latency within the bucket slack is never a regression; beyond the ratio it is.
    assert not judge(Traffic(1000, 0, 2.0), Traffic(1000, 0, 6.5), limits).regressed
    slow = judge(before, Traffic(requests=1200, errors=0, p99_ms=25.0), limits)
    assert slow.regressed and "2.50x" in slow.reason
    # A p99 over fewer than 1,000 replies is the slowest few (one busy moment): not judged;
    # a p90 is, and a tenth of the replies over the limit is a regression.
    assert not judge(before, Traffic(800, 0, p99_ms=25.0, p90_ms=8.0), limits).regressed
    gross = judge(before, Traffic(300, 0, p99_ms=60.0, p90_ms=40.0), limits)
    assert gross.regressed and "p90 is 40.0 ms" in gross.reason, gross.reason
    # Over too few replies even a p90 is not judged.
    assert not judge(before, Traffic(100, 0, p99_ms=60.0, p90_ms=40.0), limits).regressed
    # A version that was failing before is judged against its own rate.
    assert not judge(Traffic(1000, 50, 10.0), Traffic(100, 5, 10.0), limits).regressed
    # ... but its rate on a quiet minute's few requests is no rate: 1 of 3 allows no 34%.
    assert judge(Traffic(3, 1, 10.0), Traffic(1000, 300, 10.0), limits).regressed
    with pytest.raises(ValueError):
        BakeLimits(max_p99_ratio=0.5)
