"""The request router: frontend ROUTER for producers, backend ROUTER for workers.

Frames in, frames out; bodies are never decoded, except one that carries `timeout_ms` (for
its deadline). Load balancing is by credit (zguide "load-balancing broker"): a worker
announces its capacity in READY and receives at most that many requests at once; everything
else waits in a bounded per-version queue.

Which version an unpinned request goes to is decided in exactly one place: `route_version`.

The broker does not know processes. The supervisor hands it each worker's record (anything
with the attributes of `RoutedWorker`) when it spawns the worker, and the broker reports what
happened on the backend as events (`take_events`) that the serve loop hands to the
supervisor: a worker announced itself, a probe came back, a heartbeat arrived.
"""

from __future__ import annotations

import errno
import logging
import math
import random
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import orjson
import zmq

from router import protocol
from router.auth import CurveServer

log = logging.getLogger("zeropool.router")

# How many messages one readable event drains before yielding to the other sockets.
DRAIN_BURST = 256
# A request re-dispatched this many times after worker crashes fails with worker_failed.
MAX_ATTEMPTS = 3
NOBLOCK = int(zmq.NOBLOCK)
RCVMORE = int(zmq.RCVMORE)
SNDMORE_NOBLOCK = int(zmq.SNDMORE) | NOBLOCK
PROBE_ID = b"probe"  # request id of the router's own requests (never sent to a producer)


@dataclass(slots=True)
class Pending:
    envelope: list[bytes]
    request_id: bytes
    op: bytes
    body: bytes
    version: str
    pinned: bool
    enqueued: float  # arrival: the clock of the client's timeout_ms
    # The clock of the queue timeout: now minus the seconds it has waited in a queue so far
    # (arrival while it waits; set again when re-queued, so a crashed worker's time is left
    # out but its earlier waits are not).
    queued_since: float = 0.0
    attempts: int = 0
    deadline: float = 0.0  # enqueued + the body's timeout_ms; 0: none
    # Set for the router's own probes (health checks): what the reply is for. Its reply is
    # reported as a ProbeAnswered event, never sent to a producer.
    probe: str = ""
    waited: float = 0.0  # seconds it had waited in queues when last sent to a worker


class RoutedWorker(Protocol):
    """What the broker reads and writes of a worker's record (the supervisor's `Worker`)."""

    id: bytes  # the DEALER identity of the worker's socket
    version: str
    capacity: int  # requests it may hold at once (its READY capacity)
    inflight: dict[int, Pending]
    served: int
    errors: int
    last_seen: float  # the broker's clock, at the last message from the worker
    unreachable: bool  # a send to it failed: its pipe is gone or full

    @property
    def routable(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class WorkerAnnounced:
    """A worker sent READY: its model is loaded; `info` is its READY body."""

    worker: bytes
    info: bytes


@dataclass(frozen=True, slots=True)
class LoadFailed:
    """A worker could not load its model, and says why before it exits."""

    worker: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class ProbeAnswered:
    """The reply to one of the router's own requests (or worker_failed if it got none)."""

    worker: bytes
    purpose: str
    status: bytes
    body: bytes


@dataclass(frozen=True, slots=True)
class HeartbeatReceived:
    worker: bytes
    body: bytes


BrokerEvent = WorkerAnnounced | ProbeAnswered | HeartbeatReceived | LoadFailed


@dataclass(slots=True)
class Lane:
    """Everything routed to one version: its queue and whether it takes new requests."""

    version: str
    queue: deque[Pending] = field(default_factory=deque)
    open: bool = True
    failed: str | None = None  # the version cannot serve (crash loop): fail fast, don't queue
    served: int = 0
    errors: int = 0
    last_pinned_at: float = 0.0  # the clock at the arrival of the latest request pinned here
    # No queued request times out before this (a lower bound: dispatch takes requests out
    # without raising it), so a tick looks into a queue only when one may be due.
    due: float = math.inf


@dataclass(slots=True)
class BrokerStats:
    received: int = 0
    dropped: int = 0  # messages too malformed to answer
    replied_ok: int = 0
    replied_error: int = 0
    errors_by_code: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LaneView:
    version: str
    open: bool
    queued: int
    served: int
    errors: int


@dataclass(frozen=True, slots=True)
class BrokerSnapshot:
    """The router as status, health and metrics see it."""

    endpoint: str
    accepting: bool
    active: str | None
    canary: tuple[str, float] | None
    queued: int
    inflight: int
    stats: BrokerStats
    lanes: dict[str, LaneView]


# Called once per reply sent to a producer: (version or "", op or b"", "ok" or the error code,
# seconds since the request arrived or None when it never queued). Metrics and health hang here.
ReplyObserver = Callable[[str, bytes, str, float | None], None]


class Broker:
    def __init__(
        self,
        ctx: zmq.Context,
        frontend_endpoint: str,
        backend_endpoint: str,
        *,
        max_queue: int,
        queue_timeout_s: float,
        frontend_hwm: int = 100_000,
        max_message_bytes: int = -1,
        curve: CurveServer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        refuse_live_ipc(frontend_endpoint)
        self.frontend = ctx.socket(zmq.ROUTER)
        if curve is not None:
            curve.apply(self.frontend)
        self.frontend.setsockopt(zmq.LINGER, 0)
        self.frontend.setsockopt(zmq.SNDHWM, frontend_hwm)
        self.frontend.setsockopt(zmq.RCVHWM, frontend_hwm)
        self.frontend.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        # A reply to a producer that has gone must count as dropped, not vanish as sent.
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.frontend.bind(frontend_endpoint)
        self.backend = ctx.socket(zmq.ROUTER)
        self.backend.setsockopt(zmq.LINGER, 0)
        # Workers are ours: a send to a vanished worker must fail loudly, not vanish.
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.backend.bind(backend_endpoint)
        self.frontend_endpoint = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.clock = clock
        self.workers: dict[bytes, RoutedWorker] = {}
        self.lanes: dict[str, Lane] = {}
        self.active: str | None = None
        self.canary: tuple[str, float] | None = None
        self.accepting = True
        self.stats = BrokerStats()
        self.observer: ReplyObserver | None = None
        self._events: list[BrokerEvent] = []
        self._seq = 0
        self._queued = 0
        self._rng = random.Random()

    def take_events(self) -> list[BrokerEvent]:
        """What happened on the backend since the last call, in order."""
        events, self._events = self._events, []
        return events

    # -- lanes: changed only by the supervisor's sync_lanes ------------------------------

    def open_lane(self, version: str) -> None:
        lane = self.lanes.get(version)
        if lane is None:
            self.lanes[version] = Lane(version)
        else:
            lane.open = True

    def set_lane_failure(self, version: str, reason: str | None) -> None:
        """With a reason, the version cannot serve: queued and new requests get worker_failed
        at once. None: it serves again."""
        lane = self.lanes.get(version)
        if lane is None or lane.failed == reason:
            return
        lane.failed = reason
        if reason is not None:
            self._fail_queue(lane, protocol.WORKER_FAILED, f"{version} cannot serve: {reason}")

    def close_lane(self, version: str) -> None:
        """New requests pinned to `version` get unknown_version; queued ones still run."""
        lane = self.lanes.get(version)
        if lane is not None:
            lane.open = False

    def remove_lane(self, version: str) -> None:
        """Forget `version`; anything still queued for it fails as unknown_version."""
        lane = self.lanes.pop(version, None)
        if lane is not None:
            self._fail_queue(lane, protocol.UNKNOWN_VERSION, f"version {version} was unloaded")

    # -- routing policy ------------------------------------------------------------------

    def set_active(self, version: str | None, canary: tuple[str, float] | None = None) -> None:
        """Route unpinned requests to `version` (and a share to a canary) from now on.

        Unpinned requests still queued for a version that no longer gets unpinned traffic
        move to the new active version, so they never wait on workers being drained.
        """
        self.active = version
        self.canary = canary
        if version is None or version not in self.lanes:
            return
        receiving = {version, canary[0]} if canary else {version}
        target = self.lanes[version]
        for lane in self.lanes.values():
            if lane.version in receiving or not lane.queue:
                continue
            kept = deque(x for x in lane.queue if x.pinned)
            moved = [x for x in lane.queue if not x.pinned]
            for pending in moved:
                pending.version = version
            # Appended after the target's own, older or not: they keep their queue clocks,
            # and expire_queued does not rely on any order.
            target.queue.extend(moved)
            target.due = min(target.due, lane.due)
            lane.queue = kept

    def route_version(self, pinned: str) -> str | None:
        """The one place that decides which version serves a request."""
        if pinned:
            version: str | None = pinned
        elif self.canary is not None and self._rng.random() < self.canary[1]:
            version = self.canary[0]
        else:
            version = self.active
        lane = self.lanes.get(version) if version else None
        return version if lane is not None and lane.open else None

    # -- frontend ------------------------------------------------------------------------

    def handle_frontend(self) -> None:
        for _ in range(DRAIN_BURST):
            try:
                frames = recv_frames(self.frontend)
            except zmq.Again:
                return
            self.stats.received += 1
            parsed = protocol.parse_request(frames)
            if isinstance(parsed, protocol.FrameError):
                self._reject(parsed)
            else:
                self._accept(parsed)

    def _reject(self, err: protocol.FrameError) -> None:
        if err.request_id is None:
            self.stats.dropped += 1
            return
        self._reply_error(err.envelope, err.request_id, err.code, err.message)
        self._tally("", b"", err.code, None)

    def _accept(self, req: protocol.Request) -> None:
        if not self.accepting:
            self._refuse(req, "", protocol.SHUTTING_DOWN, "pool is stopping")
            return
        version = self.route_version(req.version)
        if version is None:
            if req.version:
                msg = f"version {req.version[:64]!r} is not serving"
            else:
                msg = "no version is serving"
            self._refuse(req, "", protocol.UNKNOWN_VERSION, msg)  # any string: not a label
            return
        if req.op == protocol.OP_PING:
            self._answer_ping(req, version)
            return
        failed = self.lanes[version].failed
        if failed:
            self._refuse(req, version, protocol.WORKER_FAILED,
                         f"{version} cannot serve: {failed}")
            return
        if self._queued >= self.max_queue:
            self.dispatch()  # free worker credit first: the bound is on what has to wait
        if self._queued >= self.max_queue:
            self._refuse(req, version, protocol.OVERLOADED,
                         f"queue full ({self.max_queue} requests waiting); retry later")
            return
        now = self.clock()
        pending = Pending(req.envelope, req.request_id, req.op, req.body, version,
                          bool(req.version), now, now)
        timeout_ms = protocol.peek_timeout_ms(req.body)
        if timeout_ms is not None:
            pending.deadline = now + timeout_ms / 1000
        lane = self.lanes[version]
        lane.queue.append(pending)
        expires = self._expiry(pending)
        if expires < lane.due:
            lane.due = expires
        if req.version:
            lane.last_pinned_at = now
        self._queued += 1

    def _answer_ping(self, req: protocol.Request, version: str) -> None:
        # "versions": every version taking requests now (pinned ones too), with its routable
        # workers: an optional key, for a door that lists models (docs/protocol.md).
        body = orjson.dumps({"version": version, "workers": self.routable_workers(version),
                             "versions": {name: self.routable_workers(name)
                                          for name, lane in self.lanes.items() if lane.open}})
        self._send_front(protocol.reply_frames(req.envelope, req.request_id,
                                               protocol.STATUS_OK, body))
        self._tally(version, req.op, protocol.OK_CODE, None)

    # -- backend -------------------------------------------------------------------------

    def handle_backend(self) -> None:
        now = self.clock()
        for _ in range(DRAIN_BURST):
            try:
                frames = recv_frames(self.backend)
            except zmq.Again:
                return
            wid, kind = frames[0], frames[1]
            worker = self.workers.get(wid)
            if worker is None:
                if kind == protocol.W_READY:
                    self.stop_worker(wid)  # stale: a worker this pool no longer knows
                continue
            worker.last_seen = now
            if kind == protocol.W_REPLY:
                self._complete(worker, frames)
            elif kind == protocol.W_READY:
                self._events.append(WorkerAnnounced(wid, frames[2]))
            elif kind == protocol.W_HEARTBEAT and len(frames) > 2:
                self._events.append(HeartbeatReceived(wid, frames[2]))
            elif kind == protocol.W_FAILED and len(frames) > 2:
                self._events.append(LoadFailed(wid, frames[2].decode(errors="replace")))

    def _complete(self, worker: RoutedWorker, frames: list[bytes]) -> None:
        """Every reply of one W_REPLY message: [wid, W_REPLY, reply entries]."""
        try:
            if len(frames) != 3:
                raise protocol.BadEntries(f"{len(frames) - 1} frames, not 2")
            replies = protocol.split_replies(frames[2])
        except protocol.BadEntries as exc:
            # A worker bug. Stopped, it is replaced, and what it held is re-run elsewhere.
            log.error("worker %s sent a reply message that does not parse (%s); stopping it",
                      worker.id.decode(errors="replace"), exc)
            self.stats.dropped += 1
            worker.unreachable = True
            self.stop_worker(worker.id)
            return
        inflight = worker.inflight
        for seq, status, body in replies:
            pending = inflight.pop(seq, None)
            if pending is not None:  # else already answered (timed out or re-dispatched)
                self._answer(worker, pending, status, body)

    def _answer(self, worker: RoutedWorker, pending: Pending, status: bytes, body: bytes) -> None:
        if pending.probe:
            self._events.append(ProbeAnswered(worker.id, pending.probe, status, body))
            return
        self._send_front(protocol.reply_frames(pending.envelope, pending.request_id, status,
                                               body))
        lane = self.lanes.get(worker.version)
        if status == protocol.STATUS_OK:
            code = protocol.OK_CODE
            worker.served += 1
            if lane is not None:
                lane.served += 1
        else:
            code = orjson.loads(body).get("code", protocol.INTERNAL)
            if code in protocol.POOL_FAULTS:  # a producer's bad request is not the worker's
                worker.errors += 1
                if lane is not None:
                    lane.errors += 1
        self._tally(worker.version, pending.op, code, self.clock() - pending.enqueued)

    # -- dispatch --------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand queued requests to workers with credit, least loaded first (as if one at a
        time to whoever has most credit), each worker's share in one message."""
        for lane in self.lanes.values():
            if not lane.queue:
                continue
            ready = [w for w in self.workers.values()
                     if w.version == lane.version and credit(w) > 0]
            if not ready:
                continue
            queue = lane.queue
            for worker, count in zip(ready, even_shares([credit(w) for w in ready],
                                                        len(queue)), strict=True):
                if count:
                    self._queued -= count
                    self._send_to_worker(worker, [queue.popleft() for _ in range(count)])

    def _send_to_worker(self, worker: RoutedWorker, batch: list[Pending]) -> None:
        """One W_REQUEST message carrying `batch`; on a failed send, every request of it is
        taken back (re-queued in order, or a probe answered worker_failed)."""
        entries = []
        now = self.clock()
        for pending in batch:
            self._seq += 1
            pending.attempts += 1
            pending.waited = now - pending.queued_since
            worker.inflight[self._seq] = pending
            entries.append(protocol.request_entry(self._seq, int(pending.enqueued * 1e9),
                                                  pending.op, pending.body))
        try:
            send_frames(self.backend, [worker.id, protocol.W_REQUEST, b"".join(entries)])
        except zmq.ZMQError:
            # The worker's pipe is gone or full: take the requests back, stop using the worker.
            worker.unreachable = True
            for pending in reversed(batch):
                del worker.inflight[self._seq]
                self._seq -= 1
                pending.attempts -= 1
                if pending.probe:
                    self._probe_failed(worker.id, pending.probe, "unreachable")
                else:
                    self._requeue_front(pending)

    # -- workers (the supervisor's records) ------------------------------------------------

    def add_worker(self, worker: RoutedWorker) -> None:
        """Route to `worker` once it is routable; its messages are accepted from now on."""
        worker.last_seen = self.clock()
        self.workers[worker.id] = worker

    def probe(self, worker_id: bytes, purpose: str, op: bytes, body: bytes) -> None:
        """Send the router's own request to one worker, routable or not (health checks);
        the reply comes back as a ProbeAnswered event (worker_failed at once for a worker
        already forgotten, as for one that dies holding it)."""
        worker = self.workers.get(worker_id)
        if worker is None:
            self._probe_failed(worker_id, purpose, "the worker is gone")
            return
        pending = Pending([], PROBE_ID, op, body, worker.version, True, self.clock(),
                          attempts=MAX_ATTEMPTS, probe=purpose)
        self._send_to_worker(worker, [pending])

    def stop_worker(self, worker_id: bytes) -> None:
        try:
            send_frames(self.backend, [worker_id, protocol.W_STOP])
        except zmq.ZMQError:
            pass  # already gone; the supervisor reaps it either way

    def forget_worker(self, worker_id: bytes, reason: str) -> None:
        """The worker process is gone: re-dispatch what it held, bounded by MAX_ATTEMPTS."""
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return
        for pending in sorted(worker.inflight.values(), key=lambda x: x.enqueued, reverse=True):
            if pending.probe:
                self._probe_failed(worker_id, pending.probe, reason)
            elif pending.attempts >= MAX_ATTEMPTS:
                self._fail(pending, protocol.WORKER_FAILED,
                           f"worker died {pending.attempts}x: {reason}")
            elif pending.version in self.lanes:
                self._requeue_front(pending)
            elif not pending.pinned and self.active in self.lanes:
                # Its version was retired meanwhile: an unpinned request goes to what serves now.
                pending.version = self.active
                self._requeue_front(pending)
            else:
                self._fail(pending, protocol.WORKER_FAILED,
                           f"worker died and {pending.version} is gone")
        worker.inflight.clear()

    def _probe_failed(self, worker_id: bytes, purpose: str, reason: str) -> None:
        self._events.append(ProbeAnswered(worker_id, purpose, protocol.STATUS_ERROR,
                                          protocol.error_body(protocol.WORKER_FAILED, reason)))

    def _requeue_front(self, pending: Pending) -> None:
        # Time spent inside a worker that died is not time spent waiting for one; the time
        # it waited before still counts. At the front: it has waited longest.
        pending.queued_since = self.clock() - pending.waited
        lane = self.lanes[pending.version]
        lane.queue.appendleft(pending)
        lane.due = min(lane.due, self._expiry(pending))
        self._queued += 1

    # -- housekeeping ----------------------------------------------------------------------

    def expire_queued(self, now: float) -> None:
        """Answer `timeout` for queued requests past their timeout_ms or the queue timeout."""
        for lane in self.lanes.values():
            if now >= lane.due:
                self._expire_lane(lane, now)

    def _expire_lane(self, lane: Lane, now: float) -> None:
        queue, expiry = lane.queue, self._expiry
        late: list[Pending] = []
        # Arrivals join at the back, so expiries are mostly at the front: taken in O(late).
        while queue and expiry(queue[0]) <= now:
            late.append(queue.popleft())
        # But not only (re-queued requests go to the front, moved ones to the back,
        # timeout_ms differs per request): the rest is looked at too, for any late one and
        # the next due; only when lane.due has come, at most --max-queue requests. One tight
        # pass (_expiry inline: this loop is the broker tick's cost under overload).
        due, timeout, straggler = math.inf, self.queue_timeout_s, False
        for pending in queue:
            expires = pending.queued_since + timeout
            if 0 < pending.deadline < expires:
                expires = pending.deadline
            if expires <= now:
                straggler = True
            elif expires < due:
                due = expires
        if straggler:
            late += [x for x in queue if expiry(x) <= now]
            lane.queue = deque(x for x in queue if expiry(x) > now)
        lane.due = due
        self._queued -= len(late)
        for pending in late:
            self._fail(pending, protocol.TIMEOUT, self._timeout_message(pending))

    def _expiry(self, pending: Pending) -> float:
        """When a queued request times out: its queue timeout, or its timeout_ms if sooner."""
        expires = pending.queued_since + self.queue_timeout_s
        deadline = pending.deadline
        return deadline if 0 < deadline < expires else expires

    def _timeout_message(self, pending: Pending) -> str:
        if 0 < pending.deadline < pending.queued_since + self.queue_timeout_s:
            allowed_ms = round((pending.deadline - pending.enqueued) * 1000)
            return f"no worker could start it within its timeout_ms={allowed_ms}"
        return "no worker could start it in time"

    def fail_all_queued(self, code: str, message: str) -> None:
        for lane in self.lanes.values():
            self._fail_queue(lane, code, message)

    def _fail_queue(self, lane: Lane, code: str, message: str) -> None:
        while lane.queue:
            self._queued -= 1
            self._fail(lane.queue.popleft(), code, message)

    # -- queries -----------------------------------------------------------------------------

    def queue_length(self, version: str) -> int:
        lane = self.lanes.get(version)
        return len(lane.queue) if lane is not None else 0

    def version_load(self, version: str) -> int:
        """Queued plus in-flight requests of one version."""
        held = sum(len(w.inflight) for w in self.workers.values() if w.version == version)
        return self.queue_length(version) + held

    def routable_workers(self, version: str) -> int:
        return sum(1 for w in self.workers.values() if w.version == version and w.routable)

    def pinned_quiet_for(self, version: str, now: float) -> float:
        """Seconds since the last request pinned to `version` arrived (inf if none did)."""
        lane = self.lanes.get(version)
        if lane is None or not lane.last_pinned_at:
            return float("inf")
        return now - lane.last_pinned_at

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def inflight(self) -> int:
        return sum(len(w.inflight) for w in self.workers.values())

    def snapshot(self) -> BrokerSnapshot:
        lanes = {name: LaneView(name, lane.open, len(lane.queue), lane.served, lane.errors)
                 for name, lane in self.lanes.items()}
        return BrokerSnapshot(self.frontend_endpoint, self.accepting, self.active, self.canary,
                              self._queued, self.inflight, self.stats, lanes)

    def close(self) -> None:
        self.frontend.close(linger=0)
        self.backend.close(linger=0)

    # -- replies ---------------------------------------------------------------------------

    def _fail(self, pending: Pending, code: str, message: str) -> None:
        self._reply_error(pending.envelope, pending.request_id, code, message)
        self._tally(pending.version, pending.op, code, self.clock() - pending.enqueued)

    def _refuse(self, req: protocol.Request, version: str, code: str, message: str) -> None:
        """Answer a request that never queued."""
        self._reply_error(req.envelope, req.request_id, code, message)
        self._tally(version, req.op, code, None)

    def _reply_error(self, envelope: list[bytes], request_id: bytes, code: str, msg: str) -> None:
        self._send_front(protocol.error_frames(envelope, request_id, code, msg))

    def _tally(self, version: str, op: bytes, code: str, seconds: float | None) -> None:
        if code == protocol.OK_CODE:
            self.stats.replied_ok += 1
        else:
            self.stats.replied_error += 1
            self.stats.errors_by_code[code] = self.stats.errors_by_code.get(code, 0) + 1
        if self.observer is not None:
            self.observer(version, op, code, seconds)

    def _send_front(self, frames: list[bytes]) -> None:
        try:
            send_frames(self.frontend, frames)
        except zmq.ZMQError:
            # Peer gone or over its high-water mark: a slow producer must not stall others.
            self.stats.dropped += 1


def credit(worker: RoutedWorker) -> int:
    """How many more requests `worker` may be sent now."""
    return worker.capacity - len(worker.inflight) if worker.routable else 0


def even_shares(credits: list[int], count: int) -> list[int]:
    """How many of `count` requests each worker gets, the most credit first, so that the
    credits left are as even as they can be: water-filling from the top. The same split as
    handing requests one at a time to whoever has most credit, computed at once."""
    order = sorted(range(len(credits)), key=lambda i: -credits[i])
    shares = [0] * len(credits)
    level, above = credits[order[0]] if order else 0, 0
    while count > 0 and level > 0:
        while above < len(order) and credits[order[above]] >= level:
            above += 1
        next_level = credits[order[above]] if above < len(order) else 0
        room = (level - next_level) * above
        if room >= count:
            each, extra = divmod(count, above)
            for rank in range(above):
                shares[order[rank]] += each + int(rank < extra)
            break
        for rank in range(above):
            shares[order[rank]] += level - next_level
        count -= room
        level = next_level
    return shares


def refuse_live_ipc(endpoint: str) -> None:
    """libzmq silently takes over an ipc:// path another process listens on; refuse instead.

    A leftover socket file nobody listens on (a crashed pool) is fine: bind replaces it.
    """
    if not endpoint.startswith("ipc://"):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(endpoint[len("ipc://"):])
    except OSError:
        return  # no such file, or nobody listening
    finally:
        probe.close()
    raise zmq.ZMQError(errno.EADDRINUSE, f"{endpoint} is in use by another process")


def send_frames(sock: zmq.Socket, frames: list[bytes]) -> None:
    """send_multipart without blocking, with plain-int flags: pyzmq's enum flags cost ~15%
    of the router's time in Flag arithmetic (profiled with py-spy under echo load)."""
    last = len(frames) - 1
    send = sock.send
    for i, frame in enumerate(frames):
        send(frame, SNDMORE_NOBLOCK if i < last else NOBLOCK)


def recv_frames(sock: zmq.Socket) -> list[bytes]:
    """recv_multipart(NOBLOCK) without pyzmq's enum conversion of RCVMORE on every frame
    (7% of the router's time under echo load, py-spy); raises zmq.Again when empty."""
    recv, more = sock.recv, sock.get
    frames = [recv(NOBLOCK)]
    while more(RCVMORE):
        frames.append(recv(NOBLOCK))
    return frames
