"""Failover over several pools (issue #17).

First the rules alone (router.failover.Dispatcher with a fake clock: no sockets, no sleeping),
then the client against real `pool serve` processes on real sockets: pools killed, stopped,
cut off the network (Linux network namespaces) and brought back, with requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from router import protocol
from router.client import (
    AsyncClient,
    Client,
    NoReply,
    Overloaded,
    ShuttingDown,
    Similarity,
    ZeroPoolError,
    decode_reply,
)
from router.failover import (
    Call,
    Dispatcher,
    FailoverPolicy,
    expand_targets,
    needs_failover,
    parse_dns_target,
)
from tests.support import (
    SENTENCES,
    RunningPool,
    cli_in_background,
    free_port,
    start_pool,
    wait_for,
)
from tooling.netns import PORT, Machine, namespaces_unavailable

A, B, C = "tcp://10.0.0.1:5555", "tcp://10.0.0.2:5555", "tcp://10.0.0.3:5555"
POLICY = FailoverPolicy(max_attempts=3, backoff_s=0.5, max_backoff_s=4.0)

# -- the rules, with a fake clock ---------------------------------------------------------------


def dispatcher(*endpoints: str, failover: bool = True, connected: bool = True,
               policy: FailoverPolicy = POLICY) -> Dispatcher:
    core = Dispatcher(policy, failover, decode_reply, NoReply)
    for endpoint in endpoints:
        core.add_pool(endpoint)
        if connected:
            core.on_connected(endpoint)
    return core


def call(deadline: float = 10.0, index: int = 0) -> Call:
    return Call(protocol.OP_SIMILARITY, b"", b'{"pairs": [["a", "b"]]}', deadline, index=index)


def ok(rid: bytes) -> list[bytes]:
    return [protocol.PROTOCOL, rid, protocol.STATUS_OK, b'{"scores": [0.5], "version": "v1"}']


def error(rid: bytes, code: str) -> list[bytes]:
    body = b'{"code": "%s", "message": "no"}' % code.encode()
    return [protocol.PROTOCOL, rid, protocol.STATUS_ERROR, body]


def test_requests_go_to_the_least_loaded_pool_and_ties_take_turns() -> None:
    core = dispatcher(A, B, C)
    for i in range(3):
        core.submit(call(index=i))
    sends = core.place(0.0)
    assert sorted(endpoint for endpoint, _ in sends) == [A, B, C]  # one each
    by_pool = {endpoint: frames[1] for endpoint, frames in sends}
    core.on_reply(B, ok(by_pool[B]), 0.1)
    core.submit(call(index=3))
    assert [endpoint for endpoint, _ in core.place(0.1)] == [B]  # B has nothing in flight
    # One request at a time (every pool idle) still spreads over all of them.
    idle = dispatcher(A, B, C)
    seen = []
    for _ in range(6):
        idle.submit(call())
        [(endpoint, frames)] = idle.place(0.0)
        idle.on_reply(endpoint, ok(frames[1]), 0.0)
        seen.append(endpoint)
    assert set(seen) == {A, B, C} and seen[:3] != [A, A, A]


def test_a_call_waits_for_a_connected_pool_and_unreachable_ones_are_skipped() -> None:
    core = dispatcher(A, B, connected=False)
    core.on_connect_retried(A, "unreachable (connect retried)")
    core.submit(call())
    assert core.place(0.0) == []  # nothing connected yet: it waits
    core.on_connected(B)
    [(endpoint, _)] = core.place(0.1)
    assert endpoint == B


def test_a_lost_pool_s_requests_go_again_elsewhere_and_its_late_replies_are_dropped() -> None:
    core = dispatcher(A, B)
    for i in range(4):
        core.submit(call(index=i))
    first = core.place(0.0)
    on_a = [frames[1] for endpoint, frames in first if endpoint == A]
    assert len(on_a) == 2
    core.on_disconnected(A, "disconnected", 1.0)
    again = core.place(1.0)
    assert [endpoint for endpoint, _ in again] == [B, B]  # A rests
    assert {frames[1] for _, frames in again}.isdisjoint(on_a)  # new request ids
    for rid in on_a:  # A answers after all (a partition that healed): too late
        core.on_reply(A, ok(rid), 1.1)
    assert core.take_finished() == []
    for endpoint, frames in [*first, *again]:
        if endpoint == B:
            core.on_reply(B, ok(frames[1]), 1.2)
    done = core.take_finished()
    assert sorted(c.index for c in done) == [0, 1, 2, 3]  # each exactly once
    assert all(isinstance(c.result, Similarity) for c in done)
    assert core.pools[A].in_flight == 0 and core.pools[B].in_flight == 0
    resent = [c for c in done if len(c.tried) == 2]
    assert len(resent) == 2 and all(c.tried[0] == (A, "disconnected") for c in resent)


@pytest.mark.parametrize("code", [protocol.SHUTTING_DOWN, protocol.OVERLOADED])
def test_a_retryable_answer_goes_to_another_pool_and_the_pool_rests(code: str) -> None:
    core = dispatcher(A, B)
    core.submit(call())
    [(first, frames)] = core.place(0.0)
    core.on_reply(first, error(frames[1], code), 0.0)
    [(second, frames)] = core.place(0.0)
    assert second != first
    assert not core.pools[first].usable(0.1)  # resting: backoff_s
    core.on_reply(second, ok(frames[1]), 0.1)
    [done] = core.take_finished()
    assert isinstance(done.result, Similarity) and done.tried[0] == (first, f"answered {code}")


def test_a_pool_back_from_a_failure_is_probed_with_one_request_then_takes_its_share() -> None:
    core = dispatcher(A, B)
    core.on_disconnected(A, "disconnected", 0.0)
    core.on_connected(A)  # reconnected at once; still resting until 0.5
    for i in range(4):
        core.submit(call(index=i))
    assert {e for e, _ in core.place(0.1)} == {B}
    for i in range(4):
        core.submit(call(index=10 + i))
    probe = core.place(0.6)  # rested: one request goes to A, the rest to B
    assert [e for e, _ in probe].count(A) == 1
    [rid] = [frames[1] for e, frames in probe if e == A]
    core.on_reply(A, ok(rid), 0.7)
    assert core.pools[A].failures == 0
    for i in range(4):
        core.submit(call(index=20 + i))
    assert [e for e, _ in core.place(0.7)].count(A) >= 2  # healthy: the least loaded again


def test_backoff_doubles_per_failure_in_a_row_up_to_its_cap() -> None:
    assert [POLICY.backoff(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    core = dispatcher(A, B)
    core.on_disconnected(A, "disconnected", 0.0)
    core.on_connected(A)
    core.submit(call())
    core.place(0.6)  # probe... or B: make A fail again either way
    core.on_disconnected(A, "disconnected", 1.0)
    assert core.pools[A].down_until == pytest.approx(2.0)  # second failure: 1.0 s


def test_attempts_are_bounded_and_the_last_answer_names_every_pool_tried() -> None:
    core = dispatcher(A, B, C, policy=FailoverPolicy(max_attempts=2, backoff_s=0.5))
    core.submit(call())
    for step in range(2):
        [(endpoint, frames)] = core.place(float(step))
        core.on_reply(endpoint, error(frames[1], protocol.OVERLOADED), float(step))
    [done] = core.take_finished()
    assert isinstance(done.result, Overloaded)
    assert "tried" in done.result.message and len(done.tried) == 2
    lost = dispatcher(A, B, policy=FailoverPolicy(max_attempts=2, backoff_s=0.5))
    lost.submit(call())
    for step in range(2):
        [(endpoint, _)] = lost.place(float(step))
        lost.on_disconnected(endpoint, "disconnected", float(step))
    [done] = lost.take_finished()
    assert isinstance(done.result, NoReply)
    assert A in done.result.message and B in done.result.message


def test_the_deadline_ends_a_call_with_noreply_naming_the_pools_and_why() -> None:
    core = dispatcher(A, B, connected=False)
    core.on_connect_retried(A, "unreachable (connect retried)")
    core.submit(call(deadline=1.0))
    core.place(0.0)
    assert core.next_wake(0.0) == 1.0
    core.expire(0.5)
    assert core.take_finished() == []
    core.expire(1.0)
    [done] = core.take_finished()
    assert isinstance(done.result, NoReply)
    assert f"{A} (unreachable (connect retried))" in done.result.message
    assert f"{B} (not connected yet)" in done.result.message
    # On a pool that never answers: its in-flight count is given back, a late reply dropped.
    core = dispatcher(A)
    core.submit(call(deadline=1.0))
    [(_, frames)] = core.place(0.0)
    core.expire(2.0)
    core.on_reply(A, ok(frames[1]), 2.1)
    [done] = core.take_finished()
    assert isinstance(done.result, NoReply) and core.pools[A].in_flight == 0


def test_a_lone_endpoint_behaves_as_before_no_resend_no_early_failure() -> None:
    core = dispatcher(A, failover=False, connected=False)
    assert core.pools[A].usable(0.0)  # its socket queues until connected
    core.submit(call())
    [(_, frames)] = core.place(0.0)
    core.on_disconnected(A, "disconnected", 0.1)  # reconnects by itself; nothing fails
    assert core.take_finished() == []
    core.on_reply(A, error(frames[1], protocol.SHUTTING_DOWN), 0.2)
    [done] = core.take_finished()
    assert isinstance(done.result, ShuttingDown)  # the caller sees the pool's answer
    assert done.result.message == "no"


def test_retired_pools_close_once_their_requests_have_ended() -> None:
    core = dispatcher(A, B)
    core.submit(call())
    core.submit(call())
    sends = dict(core.place(0.0))
    core.retire_pool(A)
    assert core.closable() == []  # one request still in flight there
    core.submit(call())
    assert [e for e, _ in core.place(0.0)] == [B]  # no new work for A
    core.on_reply(A, ok(sends[A][1]), 0.1)
    assert core.closable() == [A] and A not in core.pools


def test_refused_everywhere_is_known_and_one_pool_letting_in_clears_it() -> None:
    core = dispatcher(A, B, connected=False)
    core.on_refused(A, "refused", 0.0)
    assert not core.all_refused()
    core.on_refused(B, "refused", 0.0)
    assert core.all_refused()
    core.on_connected(B)
    assert not core.all_refused()


def test_targets_static_and_dns() -> None:
    assert not needs_failover(["tcp://a:1"])
    assert needs_failover(["tcp://a:1", "tcp://b:1"]) and needs_failover(["dns://pods:5555"])
    assert parse_dns_target("dns://zeropool-pods.ns.svc:5555") == ("zeropool-pods.ns.svc", 5555)
    with pytest.raises(ValueError, match="dns://NAME:PORT"):
        parse_dns_target("dns://pods")
    answers = {"pods": ["10.0.0.1", "[fd00::2]"]}

    def resolver(host: str, port: int) -> list[str]:
        if host not in answers:
            raise OSError("no such name")
        return answers[host]

    first = expand_targets(["ipc:///x", "dns://pods:5555"], resolver, {})
    assert first == {"ipc:///x": ["ipc:///x"],
                     "dns://pods:5555": ["tcp://10.0.0.1:5555", "tcp://[fd00::2]:5555"]}
    del answers["pods"]  # a DNS hiccup keeps what it had
    assert expand_targets(["dns://pods:5555"], resolver, first)["dns://pods:5555"] == \
        first["dns://pods:5555"]


# -- real pools, real sockets, machines in network namespaces ------------------------------------

# Fast to notice trouble, so that the tests stay short: a silent pool is dropped after 1 s.
TEST_POLICY = FailoverPolicy(heartbeat_ivl_ms=250, heartbeat_timeout_ms=1000,
                             heartbeat_ttl_ms=5000, connect_timeout_ms=1000, backoff_s=0.2,
                             max_backoff_s=1.0, resolve_every_s=0.3)
CALL_TIMEOUT_S = 15.0
# Each run takes its own 10.77.N.0/24 subnets, so that concurrent runs do not collide.
SUBNET_BASE = 10 + (os.getpid() % 60) * 4


def needs_namespaces() -> None:
    why = namespaces_unavailable()
    if why is not None:
        pytest.skip(f"{why}; run the suite as root")


@dataclass
class Fleet:
    """Pools, each on a machine of its own, named by the version each serves (its name), so
    that a reply says which pool answered."""

    models: dict[str, Path]
    machines: dict[str, Machine] = field(default_factory=dict)
    pools: dict[str, RunningPool] = field(default_factory=dict)

    def add_machine(self, name: str, index: int) -> Machine:
        self.machines[name] = Machine(name, SUBNET_BASE + index).create()
        return self.machines[name]

    def start(self, *names: str) -> None:
        """Start a pool on each machine named (all at once), and wait for every one."""
        for name in names:
            machine = self.machines[name]
            self.pools[name] = start_pool(
                self.models["v1"], "--bind", machine.endpoint, workers=1, version=name,
                wait=False, own_group=True, endpoint=machine.endpoint,
                prefix=machine.prefix)
        for name in names:
            self.pools[name].process.wait_ready(self.pools[name].endpoint, workers=1,
                                                timeout=120)

    def alive(self, name: str) -> bool:
        pool = self.pools.get(name)
        return pool is not None and pool.process.proc.poll() is None

    def ensure(self, *names: str) -> None:
        """These pools up (restarted when an earlier test took one down)."""
        missing = [name for name in names if not self.alive(name)]
        for name in missing:
            self.discard(name)
        if missing:
            self.start(*missing)
        for name in names:
            self.machines[name].heal()

    def endpoints(self, *names: str) -> list[str]:
        return [self.machines[name].endpoint for name in names]

    def kill(self, name: str) -> None:
        """SIGKILL to the whole pool: its server and every worker, as a machine dies."""
        pool = self.pools[name]
        children = pool.children()
        os.killpg(pool.process.pid, signal.SIGKILL)
        for proc in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        pool.process.proc.wait(10)

    def discard(self, name: str) -> None:
        pool = self.pools.pop(name, None)
        if pool is None:
            return
        if pool.process.proc.poll() is None:
            pool.process.stop(timeout=30)
        for proc in pool.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        pool.process.stop(timeout=1)  # closes its log
        shutil.rmtree(pool.state_dir, ignore_errors=True)

    def close(self) -> None:
        for name in list(self.pools):
            self.discard(name)
        for machine in self.machines.values():
            machine.delete()


@pytest.fixture(scope="module")
def fleet(models: dict[str, Path]) -> Iterator[Fleet]:
    """Three machines (network namespaces), a pool on each: a, b and c."""
    needs_namespaces()
    fleet = Fleet(models)
    try:
        for index, name in enumerate("abc"):
            fleet.add_machine(name, index)
        # A fourth machine with nothing listening: connections to it are refused.
        fleet.add_machine("e", 3)
        fleet.start("a", "b", "c")
        yield fleet
    finally:
        fleet.close()


@dataclass
class Outcome:
    sent: float  # monotonic
    latency: float
    answer: str  # the answering pool (its version) or the error's code


class FailoverLoad:
    """Producers on failover clients in a thread of their own: `in_flight` calls at a time on
    an AsyncClient, and a blocking Client's pipelined batches beside them, until stop().
    Every call's one result is recorded by its own number: a call answered twice or never
    would show."""

    def __init__(self, endpoints: list[str], in_flight: int = 12, pause_s: float = 0.0) -> None:
        self.endpoints = endpoints
        self.in_flight = in_flight
        self.pause_s = pause_s
        self.started = 0
        self.outcomes: dict[int, Outcome] = {}
        self.repeats = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=lambda: asyncio.run(self._async_producers())),
                         threading.Thread(target=self._blocking_producer)]

    def start(self) -> FailoverLoad:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> FailoverLoad:
        self._stop.set()
        for thread in self._threads:
            thread.join(CALL_TIMEOUT_S + 10)
        assert not any(t.is_alive() for t in self._threads), "a producer did not finish"
        return self

    def _record(self, number: int, sent: float, answer: str) -> None:
        if number in self.outcomes:
            self.repeats += 1
        self.outcomes[number] = Outcome(sent, time.monotonic() - sent, answer)

    def _next(self) -> int:
        self.started += 1  # one thread at a time holds the GIL: a plain counter will do
        return self.started

    async def _async_producers(self) -> None:
        async with AsyncClient(self.endpoints, timeout=CALL_TIMEOUT_S,
                               policy=TEST_POLICY) as client:
            await asyncio.gather(*(self._async_producer(client, k)
                                   for k in range(self.in_flight)))

    async def _async_producer(self, client: AsyncClient, k: int) -> None:
        while not self._stop.is_set():
            number, sent = self._next(), time.monotonic()
            pair = (SENTENCES[number % len(SENTENCES)], SENTENCES[k % len(SENTENCES)])
            try:
                answer = (await client.similarity([pair])).version
            except ZeroPoolError as exc:
                answer = exc.code
            self._record(number, sent, answer)
            await asyncio.sleep(self.pause_s)

    def _blocking_producer(self) -> None:
        with Client(self.endpoints, timeout=CALL_TIMEOUT_S, policy=TEST_POLICY) as client:
            while not self._stop.is_set():
                numbers = [self._next() for _ in range(8)]
                sent = time.monotonic()
                batches = [[(SENTENCES[n % len(SENTENCES)], SENTENCES[0])] for n in numbers]
                results = client.similarity_many(batches, in_flight=4)
                for number, result in zip(numbers, results, strict=True):
                    answer = result.code if isinstance(result, ZeroPoolError) else \
                        result.version
                    self._record(number, sent, answer)
                time.sleep(self.pause_s)

    # -- what happened -----------------------------------------------------------------------

    def failures(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for outcome in self.outcomes.values():
            if len(outcome.answer) > 1:  # pools are one letter; anything longer is a code
                out[outcome.answer] = out.get(outcome.answer, 0) + 1
        return out

    def answered_by(self, since: float = 0.0) -> set[str]:
        return {o.answer for o in self.outcomes.values() if o.sent >= since}

    def slowest(self, since: float) -> float:
        return max((o.latency for o in self.outcomes.values() if o.sent >= since), default=0)

    def check_every_call_answered_once(self) -> None:
        assert self.repeats == 0
        assert len(self.outcomes) == self.started, (self.started, len(self.outcomes))
        assert self.failures() == {}, self.failures()


def run_load_until(load: FailoverLoad, count: int, what: str) -> None:
    target = len(load.outcomes) + count
    wait_for(lambda: len(load.outcomes) >= target, timeout=60, what=what, poll=0.05)


def test_a_pool_cut_off_the_network_is_left_within_the_heartbeat_timeout_then_rejoins(
        fleet: Fleet) -> None:
    fleet.ensure("a", "b")
    load = FailoverLoad(fleet.endpoints("a", "b")).start()
    try:
        run_load_until(load, 200, "load on both pools")
        wait_for(lambda: load.answered_by() == {"a", "b"}, timeout=30, poll=0.05,
                 what="both pools answering (each connects in its own time)")
        fleet.machines["a"].cut()  # no reset: only the heartbeats can tell
        cut, held = time.monotonic(), load.started
        # What a held when cut was sent again to b, after the heartbeat timeout, not at the
        # call's deadline (then it would be a failure: NoReply).
        wait_for(lambda: all(n in load.outcomes for n in range(1, held + 1)), timeout=30,
                 what="every call sent before the cut answered", poll=0.05)
        stalled, left = load.slowest(since=cut - 0.5), time.monotonic()
        assert stalled > TEST_POLICY.heartbeat_timeout_ms / 1000  # a held some: resent
        run_load_until(load, 200, "load while a is cut off")
        assert load.answered_by(since=left) == {"b"}
        healed = time.monotonic()
        fleet.machines["a"].heal()
        wait_for(lambda: "a" in load.answered_by(since=healed), timeout=30,
                 what="a taking traffic again after the link came back", poll=0.1)
    finally:
        fleet.machines["a"].heal()
        load.stop()
    load.check_every_call_answered_once()
    print(f"partition: slowest call {stalled:.2f} s (heartbeat timeout "
          f"{TEST_POLICY.heartbeat_timeout_ms} ms); {len(load.outcomes)} calls")


def test_sigterm_one_pool_then_sigkill_another_and_an_unreachable_one_is_skipped(
        fleet: Fleet) -> None:
    fleet.ensure("a", "b", "c")
    # e's machine has nothing listening: refused, skipped from the start.
    load = FailoverLoad(fleet.endpoints("a", "b", "c", "e")).start()
    try:
        run_load_until(load, 200, "load on three pools")
        wait_for(lambda: load.answered_by() == {"a", "b", "c"}, timeout=30, poll=0.05,
                 what="the three pools answering (each connects in its own time)")
        fleet.pools["b"].process.proc.send_signal(signal.SIGTERM)  # drains, then stops
        fleet.pools["b"].process.proc.wait(60)
        stopped = time.monotonic()
        run_load_until(load, 300, "load after b stopped")
        assert load.answered_by(since=stopped) == {"a", "c"}
        fleet.kill("a")  # the server and its workers at once, requests in flight
        killed = time.monotonic()
        run_load_until(load, 300, "load after a was killed")
        assert load.answered_by(since=killed) == {"c"}
    finally:
        load.stop()
    load.check_every_call_answered_once()



def test_pool_bench_over_several_pools_fails_over_when_one_is_killed(fleet: Fleet,
                                                                    tmp_path: Path) -> None:
    """`pool bench -e A,B,C` runs its producers on the failover client: a pool killed mid-run
    costs no request (with --round-robin its requests in flight would be lost)."""
    fleet.ensure("a", "b", "c")
    report_file = tmp_path / "bench.json"
    with cli_in_background("bench", "-e", ",".join(fleet.endpoints("a", "b", "c")),
                           "--duration", "8", "--concurrency", "24", "--producers", "2",
                           "--json", "--json-file", str(report_file),
                           env=fleet.pools["a"].env) as bench:
        time.sleep(4)  # the producers start in ~1-2 s: the kill lands with requests in flight
        fleet.kill("b")
        stdout, stderr = bench.communicate(timeout=120)
    assert bench.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["client"] == "failover"
    assert (report["errors"], report["lost"]) == ({}, 0)
    assert report["ok"] == report["requests"] > 0
    assert set(report["versions"]) == {"a", "b", "c"}  # b answered until it died


def test_every_pool_unreachable_is_noreply_naming_each_and_why() -> None:
    # Nothing listens there (refused), and an address no route leads to (silence).
    endpoints = [f"tcp://127.0.0.1:{free_port('127.0.0.1')}", "tcp://192.0.2.1:5555"]
    with Client(endpoints, timeout=1.5, policy=TEST_POLICY) as client:
        started = time.monotonic()
        with pytest.raises(NoReply) as caught:
            client.similarity([("a", "b")])
        assert time.monotonic() - started < 5
    message = str(caught.value)
    assert all(endpoint in message for endpoint in endpoints), message
    assert "unreachable" in message or "not connected" in message

    async def async_call() -> str:
        async with AsyncClient(endpoints, timeout=1.5, policy=TEST_POLICY) as client:
            with pytest.raises(NoReply) as caught:
                await client.ping()
            return str(caught.value)

    message = asyncio.run(async_call())
    assert all(endpoint in message for endpoint in endpoints), message


def test_dns_names_follow_the_pods_as_they_come_and_go(fleet: Fleet) -> None:
    """dns://NAME:PORT: every address the name resolves to, looked up again and again (the
    resolver stands in for a headless Service's DNS)."""
    fleet.ensure("a", "c")
    addresses = [fleet.machines["a"].address]

    def resolver(host: str, port: int) -> list[str]:
        assert (host, port) == ("zeropool-pods", PORT)
        return list(addresses)

    with Client(f"dns://zeropool-pods:{PORT}", timeout=CALL_TIMEOUT_S, policy=TEST_POLICY,
                resolver=resolver) as client:
        assert {client.similarity([("a", "b")]).version for _ in range(5)} == {"a"}
        addresses.append(fleet.machines["c"].address)  # a pod came
        wait_for(lambda: {client.similarity([("a", "b")]).version for _ in range(6)}
                 == {"a", "c"}, timeout=10, what="the new pod taking traffic")
        addresses.remove(fleet.machines["a"].address)  # a pod went
        # Looked up on a background thread (never inside a call), so the change shows once
        # that look-up has answered, not at the first call after resolve_every_s.
        wait_for(lambda: {client.similarity([("a", "b")]).version for _ in range(6)}
                 == {"c"}, timeout=10, what="the gone pod left")
        assert set(client.pools()) == {fleet.machines["c"].endpoint}  # a's socket closed
    # And a real name, through the system's resolver.
    with Client(f"dns://localhost:{free_port('127.0.0.1')}", timeout=1.0,
                policy=TEST_POLICY) as client, pytest.raises(NoReply, match=r"127\.0\.0\.1"):
        client.ping()


def test_a_send_unanswered_past_the_attempt_timeout_goes_elsewhere_and_the_pool_rests() -> None:
    # A stuck pool: connected, answering heartbeats, computing nothing.
    policy = FailoverPolicy(max_attempts=3, backoff_s=0.5, attempt_timeout_s=2.0)
    core = dispatcher(A, B, policy=policy)
    core.pools[B].down_until = 0.5  # so that the first send goes to A
    core.submit(call(deadline=30.0))
    ((endpoint, frames),) = core.place(0.0)
    assert endpoint == A
    assert core.next_wake(0.0) == 2.0  # the attempt timeout, well before the deadline
    core.expire(1.9)
    assert core.place(1.9) == []  # not yet
    core.expire(2.0)
    ((again, frames_again),) = core.place(2.0)
    assert again == B and frames_again[1] != frames[1]
    assert not core.pools[A].usable(2.1) and core.pools[A].why == "no answer in 2s"
    core.on_reply(A, ok(frames[1]), 2.5)  # the stuck pool answers at last: dropped
    assert core.take_finished() == []
    core.on_reply(B, ok(frames_again[1]), 2.6)
    (done,) = core.take_finished()
    assert isinstance(done.result, Similarity) and done.tried[0] == (A, "no answer in 2s")
    assert core.pools[A].in_flight == 0 and core.pools[B].in_flight == 0


def test_a_lone_pool_is_never_given_up_before_the_deadline() -> None:
    core = dispatcher(A, failover=False,
                      policy=FailoverPolicy(attempt_timeout_s=2.0))
    core.submit(call(deadline=30.0))
    core.place(0.0)
    core.expire(20.0)
    assert core.take_finished() == [] and core.place(20.0) == []


async def until_all_connected(client: AsyncClient, limit_s: float = 10.0) -> None:
    """A ping is answered by whichever pool connected first; the other may still be
    connecting (a loaded 2-core CI machine took long enough for all calls to miss it)."""
    deadline = time.monotonic() + limit_s
    while not all(pool.connected for pool in client.pools().values()):
        assert time.monotonic() < deadline, client.pools()
        await asyncio.sleep(0.01)


def test_a_stuck_pool_is_left_after_the_attempt_timeout(
    pool_factory, models: dict[str, Path]
) -> None:
    """A pool whose worker is frozen (SIGSTOP): its router still answers heartbeats, so only
    the attempt timeout moves its requests to the other pool."""
    stuck, fine = (pool_factory(models["v1"], workers=1, version=name) for name in "ab")
    (worker,) = stuck.worker_pids()
    policy = FailoverPolicy(attempt_timeout_s=2.0)

    async def calls() -> list[tuple[str, float]]:
        async with AsyncClient([stuck.endpoint, fine.endpoint], timeout=20,
                               policy=policy) as client:
            await client.ping()
            await until_all_connected(client)  # else all 8 may go to the one connected first

            async def one(k: int) -> tuple[str, float]:
                sent = time.monotonic()
                pair = (SENTENCES[k % len(SENTENCES)], SENTENCES[0])
                return (await client.similarity([pair])).version, time.monotonic() - sent
            return await asyncio.gather(*(one(k) for k in range(8)))

    os.kill(worker, signal.SIGSTOP)
    try:
        results = asyncio.run(calls())
    finally:
        os.kill(worker, signal.SIGCONT)
    assert {version for version, _ in results} == {"b"}, results
    # Those first sent to the stuck pool (ties take turns: some were) waited about the
    # attempt timeout, no more.
    assert any(seconds >= 2.0 for _, seconds in results), results
    assert max(seconds for _, seconds in results) < 2.0 + 3.0, results


# A client's monitor closed, its socket still alive and failing to connect: the context must
# still connect other sockets. Run apart: a stuck I/O thread would hang the process for good.
CLOSED_MONITOR_CHECK = """
import time, zmq
from router.client import MONITOR_EVENTS, HandshakeWatch
ctx = zmq.Context()
dealer = ctx.socket(zmq.DEALER)
dealer.linger = 0
HandshakeWatch(dealer, 1, None, MONITOR_EVENTS).close()
dealer.connect("tcp://127.0.0.1:%d")  # refused: an event every 100 ms
time.sleep(0.5)
router = ctx.socket(zmq.ROUTER)
port = router.bind_to_random_port("tcp://127.0.0.1")
other = ctx.socket(zmq.DEALER)
other.connect(f"tcp://127.0.0.1:{port}")
other.send(b"still connecting")
assert router.poll(5000), "the context's I/O thread is stuck"
ctx.destroy(linger=0)
"""


def test_a_closed_monitor_never_stalls_the_clients_context() -> None:
    """libzmq sends monitor events from its I/O thread with a blocking send: a monitor PAIR
    closed while its socket is still monitored stopped that thread at the next event (libzmq
    #3575), and every socket of the context with it (a CI run's every later client)."""
    code = CLOSED_MONITOR_CHECK % free_port("127.0.0.1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
