"""Failover over several pools (issue #17).

First the rules alone (router.failover.Dispatcher with a fake clock: no sockets, no sleeping),
then the client against real `pool serve` processes on real sockets: pools killed, stopped,
cut off the network (Linux network namespaces) and brought back, with requests in flight.
"""

from __future__ import annotations

import pytest

from router import protocol
from router.client import NoReply, Overloaded, ShuttingDown, Similarity, decode_reply
from router.failover import (
    Call,
    Dispatcher,
    FailoverPolicy,
    expand_targets,
    needs_failover,
    parse_dns_target,
)

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
