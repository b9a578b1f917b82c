"""The pool's state machines in the test process: the real Broker, Supervisor and
RotationController on a fake clock, with fake worker processes that speak the backend
protocol over real in-process ZeroMQ sockets. No process is started and nothing sleeps, so
the combinatorics of routing, supervision and rotation run in milliseconds.
"""

from __future__ import annotations

import itertools
import signal
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import zmq

from pool.config import PoolSettings
from pool.metrics import RecentReplies, ReplyTally
from pool.registry import Registry
from pool.reports import BatchStats, ReadyInfo
from pool.rotation import RotationController, hand_over
from pool.supervisor import Supervisor
from pool.worker import WorkerConfig
from router import protocol
from router.broker import Broker

_ids = itertools.count(1)
_pids = itertools.count(910_000)
START = 1_000.0  # the fake clock's first reading


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@dataclass
class Request:
    """A request the router sent to a fake worker."""

    seq: bytes
    op: bytes
    body: dict


class FakeWorker:
    """A worker process as the supervisor sees it (pid, exit code, signals) with a real
    DEALER socket on the broker's in-process backend, driven by the test."""

    def __init__(self, cfg: WorkerConfig, ctx: zmq.Context, backend: str) -> None:
        self.cfg = cfg
        self.pid = next(_pids)
        self.exitcode: int | None = None
        self.signals: list[int] = []
        self.ignores_term = False  # a hung worker: only SIGKILL ends it
        self.stop_received = False
        self.inbox: list[Request] = []
        self.messages = 0  # request messages received (each may carry several requests)
        self.dim = 8  # the embedding size its READY says
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, cfg.worker_id.encode())
        self.sock.connect(backend)

    # -- the WorkerProcess interface ---------------------------------------------------------

    def signal(self, signum: int) -> None:
        self.signals.append(signum)
        if signum == signal.SIGKILL or (signum == signal.SIGTERM and not self.ignores_term):
            self.exit(-signum)

    def reap(self, timeout: float) -> None:
        self.sock.close(linger=0)

    # -- what the test makes it do -------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.cfg.worker_id

    def exit(self, code: int) -> None:
        if self.exitcode is None:
            self.exitcode = code

    def announce(self) -> None:
        info = ReadyInfo(version=self.cfg.version, worker_id=self.name, pid=self.pid,
                         capacity=self.cfg.capacity, max_batch=self.cfg.max_batch,
                         device=self.cfg.device, dtype="float32", dim=self.dim)
        self.sock.send_multipart([protocol.W_READY, info.encode()])

    def heartbeat(self, stats: BatchStats) -> None:
        self.sock.send_multipart([protocol.W_HEARTBEAT, stats.encode()])

    def read_socket(self) -> None:
        """Take in what the router sent: requests wait in `inbox`, STOP is noted."""
        while self.exitcode is None and self.sock.poll(0):
            frames = self.sock.recv_multipart()
            if frames[0] == protocol.W_STOP:
                self.stop_received = True
                continue
            self.messages += 1
            for seq, _enqueued_ns, op, body in protocol.split_requests(frames[1]):
                self.inbox.append(Request(seq, op, orjson.loads(body)))

    def received(self) -> list[Request]:
        """Every request sent to this worker and not yet handed out."""
        self.read_socket()
        out, self.inbox = self.inbox, []
        return out

    def answer(self, request: Request, scores: list[float] | None = None,
               error: str | None = None) -> None:
        self.answer_all([request], scores, error)

    def answer_all(self, requests: list[Request], scores: list[float] | None = None,
                   error: str | None = None) -> None:
        """Reply to `requests` in one message, as a worker does after a forward pass."""
        entries = []
        for request in requests:
            if error is not None:
                status, body = protocol.STATUS_ERROR, protocol.error_body(error, "fake failure")
            else:
                answer = scores or [1.0 if a == b else 0.5 for a, b in request.body["pairs"]]
                status = protocol.STATUS_OK
                body = orjson.dumps({"scores": answer, "version": self.cfg.version})
            entries.append(protocol.reply_entry(request.seq, status, body))
        self.sock.send_multipart([protocol.W_REPLY, b"".join(entries)])


@dataclass
class Producer:
    """A producer's DEALER on the broker's in-process frontend."""

    sock: zmq.Socket
    replies: dict[bytes, tuple[bytes, dict]] = field(default_factory=dict)

    def send(self, request_id: bytes, *, version: str = "", timeout_ms: int | None = None,
             op: bytes = protocol.OP_SIMILARITY) -> None:
        doc: dict = {"pairs": [["a", "b"]]}
        if timeout_ms is not None:
            doc["timeout_ms"] = timeout_ms
        self.sock.send_multipart([protocol.PROTOCOL, request_id, op, version.encode(),
                                  orjson.dumps(doc)])

    def collect(self) -> dict[bytes, tuple[bytes, dict]]:
        while self.sock.poll(0):
            _, rid, status, body = self.sock.recv_multipart()
            assert rid not in self.replies, f"a second reply to {rid!r}"
            self.replies[rid] = (status, orjson.loads(body))
        return self.replies

    def codes(self) -> dict[bytes, str]:
        """Request id -> "ok" or the error code."""
        return {rid: "ok" if status == protocol.STATUS_OK else body["code"]
                for rid, (status, body) in self.collect().items()}


class FakePool:
    """Broker + supervisor + rotation controller wired as `pool serve` wires them."""

    def __init__(self, state_dir: Path, *, workers: int = 2, max_batch: int = 2,
                 max_queue: int = 100, queue_timeout_s: float = 30.0,
                 crash_retry_s: float = 60.0) -> None:
        n = next(_ids)
        self.clock = FakeClock()
        self.ctx = zmq.Context()
        backend = f"inproc://backend-{n}"
        self.broker = Broker(self.ctx, f"inproc://frontend-{n}", backend, max_queue=max_queue,
                             queue_timeout_s=queue_timeout_s, clock=self.clock)
        settings = PoolSettings(path="/models/v1", workers=workers, state_dir=state_dir,
                                max_batch=max_batch, crash_retry_s=crash_retry_s)
        self.processes: list[FakeWorker] = []
        self.refuse_spawns: Exception | None = None  # what the spawner raises instead

        def spawn(cfg: WorkerConfig) -> FakeWorker:
            if self.refuse_spawns is not None:
                raise self.refuse_spawns
            worker = FakeWorker(cfg, self.ctx, backend)
            self.processes.append(worker)
            return worker

        self.supervisor = Supervisor(settings, self.broker, spawn=spawn, clock=self.clock)
        self.registry = Registry(state_dir)
        # The pool's own reply counts, snapshotted once a (fake) second as the serve loop
        # does: what a bake judges.
        self.replies = ReplyTally()
        self.recent = RecentReplies(self.replies)
        self._recorded_at = START
        self.broker.observer = self.replies.add
        self.rotations = RotationController(self.supervisor, self.broker, self.registry,
                                            recent=self.recent, clock=self.clock)
        self._frontend = f"inproc://frontend-{n}"

    def close(self) -> None:
        for worker in self.processes:
            worker.sock.close(linger=0)
        self.broker.close()
        self.ctx.destroy(linger=0)

    # -- driving it -------------------------------------------------------------------------

    def producer(self) -> Producer:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self._frontend)
        return Producer(sock)

    def pump(self) -> None:
        """What the serve loop does between ticks, until nothing moves."""
        for _ in range(100):
            moved = False
            if self.broker.backend.poll(0):
                self.broker.handle_backend()
                moved = True
            events = self.broker.take_events()
            hand_over(events, self.supervisor, self.rotations)
            moved = moved or bool(events)
            if self.broker.frontend.poll(0):
                self.broker.handle_frontend()
                moved = True
            self.broker.dispatch()
            if not moved:
                return

    def tick(self, seconds: float = 0.1) -> None:
        """Let `seconds` pass, then one housekeeping tick of the serve loop."""
        self.clock.now += seconds
        self.pump()
        now = self.clock()
        if now - self._recorded_at >= 1.0:
            self.recent.record(now)
            self._recorded_at = now
        self.supervisor.tick(now)
        self.rotations.step(now)
        self.broker.expire_queued(now)
        self.pump()

    def load(self, version: str = "v1", path: str = "/models/v1", workers: int = 2) -> None:
        """What `pool serve` does at start: want the version, make it the active one."""
        self.supervisor.want(version, path, workers)
        if self.broker.active is None:
            self.broker.set_active(version)

    def workers_of(self, version: str, *states: str) -> list[FakeWorker]:
        records = self.supervisor.workers
        return [w for w in self.processes if w.exitcode is None
                and (rec := records.get(w.name.encode())) is not None
                and rec.version == version and (not states or rec.state in states)]

    def state(self, worker: FakeWorker) -> str | None:
        record = self.supervisor.workers.get(worker.name.encode())
        return record.state if record is not None else None

    def bring_up(self, version: str = "v1", scores: list[float] | None = None) -> None:
        """Spawn what is wanted, announce every loading worker, answer its health probe."""
        self.tick()
        for worker in self.workers_of(version, "loading"):
            worker.announce()
        self.pump()
        for worker in self.workers_of(version, "checking"):
            for request in worker.received():
                worker.answer(request, scores)
        self.pump()
        self.tick()

    def serve_all(self) -> int:
        """Every live worker answers everything it holds; how many it answered."""
        answered = 0
        for worker in [w for w in self.processes if w.exitcode is None]:
            for request in worker.received():
                worker.answer(request)
                answered += 1
        self.pump()
        return answered

    def finish_stops(self) -> None:
        """Workers that were sent STOP exit, as real ones do after their last batch."""
        for worker in self.processes:
            worker.read_socket()
            if worker.stop_received:
                worker.exit(0)
