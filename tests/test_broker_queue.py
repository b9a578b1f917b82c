"""The broker's queue timeout, with a fake clock over inproc sockets: every queued request
times out after --queue-timeout of waiting whatever its place in the queue (re-queued at the
front, moved to the back), the time it waited before a crash counts and the time inside the
dead worker does not, and a tick looks into no queue before something in it may be due."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import orjson
import pytest
import zmq

from router import protocol
from router.broker import Broker, Pending

QUEUE_TIMEOUT_S = 30.0
_names = itertools.count()


@dataclass(eq=False)
class FakeWorker:
    id: bytes
    version: str = "v1"
    capacity: int = 1
    inflight: dict[int, Pending] = field(default_factory=dict)
    served: int = 0
    errors: int = 0
    last_seen: float = 0.0
    unreachable: bool = False
    routable: bool = True


class Bench:
    """A Broker on inproc sockets, a producer, worker sockets, and the clock in `now`."""

    def __init__(self) -> None:
        self.now = 0.0
        self.ctx = zmq.Context()
        name = next(_names)
        front, back = f"inproc://front-{name}", f"inproc://back-{name}"
        self.broker = Broker(self.ctx, front, back, max_queue=100,
                             queue_timeout_s=QUEUE_TIMEOUT_S, clock=lambda: self.now)
        self.back = back
        self.producer = self.ctx.socket(zmq.DEALER)
        self.producer.connect(front)
        self.sockets: list[zmq.Socket] = []

    def worker(self, wid: bytes, version: str = "v1", connected: bool = True) -> FakeWorker:
        if connected:  # else a send to it fails: a worker whose pipe is gone
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, wid)
            sock.connect(self.back)
            self.sockets.append(sock)
        worker = FakeWorker(wid, version)
        self.broker.add_worker(worker)
        return worker

    def send(self, rid: bytes, version: str = "", timeout_ms: int | None = None) -> None:
        body: dict = {"pairs": [["a", "b"]]}
        if timeout_ms is not None:
            body["timeout_ms"] = timeout_ms
        self.producer.send_multipart([protocol.PROTOCOL, rid, protocol.OP_SIMILARITY,
                                      version.encode(), orjson.dumps(body)])
        assert self.broker.frontend.poll(1000)
        self.broker.handle_frontend()

    def tick(self, at: float) -> dict[bytes, str]:
        """The clock at `at`, one expiry pass; the timeouts answered, as {rid: message}."""
        self.now = at
        self.broker.expire_queued(at)
        answered = {}
        while self.producer.poll(50):
            _tag, rid, status, body = self.producer.recv_multipart()
            reply = orjson.loads(body)
            assert status == protocol.STATUS_ERROR and reply["code"] == protocol.TIMEOUT
            answered[rid] = reply["message"]
        return answered

    def queued(self, version: str = "v1") -> list[bytes]:
        return [p.request_id for p in self.broker.lanes[version].queue]

    def close(self) -> None:
        for sock in [self.producer, *self.sockets]:
            sock.close(linger=0)
        self.broker.close()
        self.ctx.term()


@pytest.fixture
def bench() -> Iterator[Bench]:
    running = Bench()
    running.broker.open_lane("v1")
    running.broker.set_active("v1")
    yield running
    running.close()


def test_a_request_requeued_at_the_front_does_not_shield_older_ones(bench: Bench) -> None:
    bench.worker(b"W")
    bench.send(b"A")
    bench.broker.dispatch()  # t=0: A goes to the worker
    bench.now = 1.0
    bench.send(b"B")
    bench.send(b"C")  # t=1: B and C wait (no credit)
    bench.now = 20.0
    bench.broker.forget_worker(b"W", "crash")  # A back at the front
    assert bench.queued() == [b"A", b"B", b"C"]
    assert bench.tick(30.9) == {}
    assert set(bench.tick(31.1)) == {b"B", b"C"}  # 30 s after they came, A ahead or not
    assert bench.queued() == [b"A"]
    assert bench.broker.queued == 1


def test_time_waited_before_a_crash_counts_and_time_inside_the_worker_does_not(
        bench: Bench) -> None:
    bench.send(b"A")  # t=0, no worker yet: it waits
    bench.now = 10.0
    bench.worker(b"W")
    bench.broker.dispatch()  # t=10: to the worker, after 10 s of waiting
    bench.now = 25.0
    bench.broker.forget_worker(b"W", "crash")  # 15 s inside the worker: not waiting
    assert bench.tick(44.9) == {}  # 10 + 19.9 s of waiting
    assert bench.tick(45.1) == {b"A": "no worker could start it in time"}


def test_a_failed_send_puts_requests_back_with_their_own_queue_clock(bench: Bench) -> None:
    bench.send(b"A")
    bench.send(b"B")
    bench.now = 20.0
    ghost = bench.worker(b"ghost", connected=False)
    ghost.capacity = 2
    bench.broker.dispatch()  # the send fails: both back, in order
    assert ghost.unreachable and bench.queued() == [b"A", b"B"]
    assert bench.tick(29.9) == {}
    assert set(bench.tick(30.1)) == {b"A", b"B"}


def test_requests_moved_to_the_back_of_the_active_queue_keep_their_clock(bench: Bench) -> None:
    broker = bench.broker
    bench.send(b"old")  # t=0, unpinned, for v1
    broker.open_lane("v2")
    bench.now = 10.0
    bench.send(b"pinned", version="v2")  # t=10, at the head of v2's queue
    bench.now = 15.0
    broker.set_active("v2")  # "old" moves behind it
    assert bench.queued("v2") == [b"pinned", b"old"]
    assert bench.tick(30.5) == {b"old": "no worker could start it in time"}
    assert bench.queued("v2") == [b"pinned"]
    assert set(bench.tick(40.5)) == {b"pinned"}


def test_timeout_ms_expires_wherever_the_request_waits(bench: Bench) -> None:
    bench.send(b"plain")
    bench.send(b"short", timeout_ms=500)
    answered = bench.tick(0.6)
    assert list(answered) == [b"short"] and "timeout_ms=500" in answered[b"short"]
    assert bench.queued() == [b"plain"]


class WatchedQueue(deque):
    """A lane's queue that counts how often it is looked into (iterated or indexed)."""

    looks = 0

    def __iter__(self) -> Iterator[Pending]:
        WatchedQueue.looks += 1
        return super().__iter__()

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        WatchedQueue.looks += 1
        return super().__getitem__(index)


def test_a_tick_looks_into_no_queue_before_something_in_it_may_be_due(bench: Bench) -> None:
    for i in range(50):
        bench.now = float(i)
        bench.send(b"r%d" % i)
    lane = bench.broker.lanes["v1"]
    lane.queue = WatchedQueue(lane.queue)
    WatchedQueue.looks = 0
    for at in (0.5, 10.0, 29.9):
        assert bench.tick(at) == {}
    assert WatchedQueue.looks == 0  # nothing due before 30 s: the queue is not looked at
    assert list(bench.tick(30.5)) == [b"r0"]
    lane.queue = WatchedQueue(lane.queue)
    WatchedQueue.looks = 0
    assert bench.tick(30.9) == {}  # the next is due at 31 s: not looked at again
    assert WatchedQueue.looks == 0
    assert list(bench.tick(31.0)) == [b"r1"]
