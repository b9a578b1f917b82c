"""The worker loop in this process (the echo model, or a stand-in model without torch),
behind a real ROUTER socket standing in for the router: how router messages of many requests
become batches and reply messages, and how the intake overlaps the device thread's passes."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import orjson
import pytest
import zmq

from pool.config import PoolSettings
from pool.modeldir import NO_PROMPTS
from pool.reports import BatchStats, ReadyInfo
from pool.worker import WorkerConfig, WorkerLoop
from router import protocol

WAIT_MS = 10_000


class GatedModel:
    """A stand-in model: token ids are character codes, every vector is the same unit
    vector, the text "boom" fails its pass, and each pass waits for `gate`."""

    dim = 2
    vocab_limit: int | None = None  # every token id has an embedding
    prompts = NO_PROMPTS  # texts as given

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.passes: list[int] = []  # texts per pass, as they start
        self.rows_short = 0  # a broken model: this many rows too few
        self.part_s: list[float] = []  # a long pass: parts of these seconds, each reported

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return [[ord(c) for c in text] for text in texts]

    def embed_tokens(self, ids: list[list[int]],
                     on_chunk: Callable[[], None] | None = None) -> SimpleNamespace:
        self.passes.append(len(ids))
        for seconds in self.part_s:
            time.sleep(seconds)
            if on_chunk is not None:
                on_chunk()
        assert self.gate.wait(WAIT_MS / 1000)
        if [ord(c) for c in "boom"] in ids:
            raise RuntimeError("the model cannot take this")
        rows = np.tile(np.array([0.6, 0.8], dtype=np.float32), (len(ids) - self.rows_short, 1))
        return SimpleNamespace(numpy=lambda: rows)


class GatedModelLoop(WorkerLoop):
    """The real worker loop on the stand-in model instead of loading one."""

    def __init__(self, model: GatedModel, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.model = model

    def _load(self) -> ReadyInfo:
        self.encoder = self.model
        return ReadyInfo(self.cfg.version, self.cfg.worker_id, os.getpid(), self.cfg.capacity,
                         self.cfg.max_batch, self.cfg.device, dim=GatedModel.dim)


class Router:
    """The test's side of the backend: sends request messages, reads reply messages."""

    def __init__(self, ctx: zmq.Context, max_batch: int, model: GatedModel | None = None,
                 heartbeat_s: float = 60) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("inproc://backend")
        worker_sock = ctx.socket(zmq.DEALER)
        worker_sock.setsockopt(zmq.LINGER, 0)
        worker_sock.setsockopt(zmq.IDENTITY, b"w1")
        worker_sock.connect("inproc://backend")
        settings = PoolSettings(path="-", state_dir=Path("-"),
                                model="echo" if model is None else "transformer",
                                max_batch=max_batch, max_wait_ms=0)
        cfg = WorkerConfig("w1", "v1", "-", "cpu", settings, heartbeat_s=heartbeat_s)
        if model is None:
            self.loop = WorkerLoop(cfg, worker_sock, os.getppid())
        else:
            self.loop = GatedModelLoop(model, cfg, worker_sock, os.getppid())
        self.failure: BaseException | None = None
        self.heartbeats: list[BatchStats] = []
        self.thread = threading.Thread(target=self._run_worker, daemon=True)
        self.thread.start()
        assert self.read()[1] == protocol.W_READY
        self.seq = 0

    def _run_worker(self) -> None:
        try:
            self.loop.run()
        except Exception as exc:  # the test looks at how the loop ended
            self.failure = exc
        finally:
            self.loop.sock.close(linger=0)

    def send_pairs(self, *pairs: tuple[str, str]) -> list[bytes]:
        return self.send([orjson.dumps({"pairs": [list(pair)]}) for pair in pairs])

    def send(self, bodies: list[bytes]) -> list[bytes]:
        """One W_REQUEST message carrying `bodies`; their seqs as the worker echoes them."""
        entries, seqs = [], []
        for body in bodies:
            self.seq += 1
            entries.append(protocol.request_entry(self.seq, time.monotonic_ns(),
                                                  protocol.OP_SIMILARITY, body))
            seqs.append(self.seq.to_bytes(protocol.SEQ_BYTES, "little"))
        self.sock.send_multipart([b"w1", protocol.W_REQUEST, b"".join(entries)])
        return seqs

    def read(self) -> list[bytes]:
        assert self.sock.poll(WAIT_MS), "the worker sent nothing"
        return self.sock.recv_multipart()

    def replies(self, count: int) -> list[list[tuple[int, bytes, dict]]]:
        """Reply messages until `count` replies came: per message, (seq, status, body)."""
        messages, seen = [], 0
        while seen < count:
            frames = self.read()
            if frames[1] == protocol.W_HEARTBEAT:
                self.heartbeats.append(BatchStats.decode(frames[2]))
            if frames[1] != protocol.W_REPLY:
                continue
            message = [(seq, status, orjson.loads(body))
                       for seq, status, body in protocol.split_replies(frames[2])]
            messages.append(message)
            seen += len(message)
        return messages

    def stop(self) -> None:
        self.sock.send_multipart([b"w1", protocol.W_STOP])
        self.thread.join(timeout=WAIT_MS / 1000)
        assert not self.thread.is_alive(), "the worker did not stop"


class Backends:
    """The test's routers, each with one worker loop on a thread; all stopped at the end."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.routers: list[Router] = []

    def start(self, max_batch: int, model: GatedModel | None = None,
              heartbeat_s: float = 60) -> Router:
        router = Router(self.ctx, max_batch, model, heartbeat_s)
        self.routers.append(router)
        return router

    def close(self) -> None:
        for router in self.routers:
            if router.thread.is_alive():
                router.stop()
            router.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def backends() -> Iterator[Backends]:
    made = Backends()
    yield made
    made.close()


@pytest.fixture
def router(backends: Backends) -> Router:
    return backends.start(max_batch=2)


def wait_until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT_MS / 1000
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.005)


PAIR = b'{"pairs": [["a", "b"]]}'


def test_a_message_of_many_requests_is_served_in_batches_of_max_batch(router: Router) -> None:
    seqs = router.send([PAIR] * 5)
    messages = router.replies(5)
    # One reply message per batch: max_batch 2 makes batches of 2, 2 and 1.
    assert [len(m) for m in messages] == [2, 2, 1]
    assert [seq for m in messages for seq, _, _ in m] == [int.from_bytes(s, "little")
                                                          for s in seqs]
    assert all(status == protocol.STATUS_OK for m in messages for _, status, _ in m)


def test_a_bad_body_in_a_message_is_answered_alone_and_the_rest_served(router: Router) -> None:
    seqs = router.send([PAIR, b"not json", PAIR])
    replies = {seq: (status, body) for m in router.replies(3) for seq, status, body in m}
    bad = int.from_bytes(seqs[1], "little")
    assert replies[bad][0] == protocol.STATUS_ERROR
    assert replies[bad][1]["code"] == protocol.BAD_REQUEST
    assert all(replies[int.from_bytes(s, "little")][0] == protocol.STATUS_OK
               for s in (seqs[0], seqs[2]))


def test_a_stop_behind_a_backlog_serves_the_backlog_first(router: Router) -> None:
    router.send([PAIR] * 7)
    router.sock.send_multipart([b"w1", protocol.W_STOP])
    messages = router.replies(7)
    assert sum(len(m) for m in messages) == 7
    router.thread.join(timeout=WAIT_MS / 1000)
    assert not router.thread.is_alive()


def test_requests_arriving_during_a_pass_are_taken_in_meanwhile_and_share_the_next(
    backends: Backends,
) -> None:
    model = GatedModel()
    router = backends.start(max_batch=64, model=model)
    model.gate.clear()
    router.send_pairs(("a", "b"))
    wait_until(lambda: model.passes == [2], "the first pass to start")
    for pair in (("c", "d"), ("e", "f"), ("g", "h")):
        router.send_pairs(pair)
    # Received, decoded and tokenised while the device thread is still inside its pass.
    wait_until(lambda: len(router.loop.queue) == 3, "the intake to queue the new requests")
    model.gate.set()
    messages = router.replies(4)
    assert [len(m) for m in messages] == [1, 3]
    assert model.passes == [2, 6]
    assert all(status == protocol.STATUS_OK and body["scores"] == [pytest.approx(1.0)]
               for m in messages for _, status, body in m)


def test_a_failing_pass_is_rerun_request_by_request_and_only_the_bad_one_fails(
    backends: Backends,
) -> None:
    model = GatedModel()
    router = backends.start(max_batch=64, model=model)
    model.gate.clear()
    router.send_pairs(("a", "b"))
    wait_until(lambda: model.passes == [2], "the first pass to start")
    seqs = router.send_pairs(("c", "d"), ("boom", "e"), ("f", "g"))
    wait_until(lambda: len(router.loop.queue) == 3, "the intake to queue the batch")
    model.gate.set()
    replies = {seq: (status, body) for m in router.replies(4) for seq, status, body in m}
    bad = replies[int.from_bytes(seqs[1], "little")]
    assert bad[0] == protocol.STATUS_ERROR and bad[1]["code"] == protocol.INTERNAL
    assert "cannot take this" in bad[1]["message"]
    assert [replies[int.from_bytes(s, "little")][0] for s in (seqs[0], seqs[2])] == [
        protocol.STATUS_OK] * 2
    assert model.passes == [2, 6, 2, 2, 2]  # the batch, then each request alone
    # Each request that was computed counts once: the failed batch is not counted besides
    # the passes that reran it.
    stats = router.loop.stats
    assert (stats.batches, stats.requests, stats.failed_batches) == (3, 3, 2)


def test_heartbeats_pause_while_a_pass_runs_past_the_interval_and_report_busy_time(
    backends: Backends,
) -> None:
    model = GatedModel()
    router = backends.start(max_batch=64, model=model, heartbeat_s=0.05)
    model.gate.clear()
    router.send_pairs(("a", "b"))
    wait_until(lambda: model.passes == [2], "the pass to start")
    time.sleep(0.3)  # the pass is past its heartbeat interval: the worker looks hung
    while router.sock.poll(0):
        router.read()
    time.sleep(0.3)
    assert not router.sock.poll(0), "heartbeats went on during a stuck pass"
    model.gate.set()
    router.replies(1)
    stats = BatchStats()
    while stats.requests == 0:  # the pass is counted once its replies are out
        frames = router.read()
        if frames[1] == protocol.W_HEARTBEAT:
            stats = BatchStats.decode(frames[2])
    assert stats.requests == 1 and stats.device_busy_s >= 0.5
    assert stats.request_pass_s == pytest.approx(stats.device_busy_s)
    assert stats.request_transit_s > 0 and stats.request_queued_s >= 0
    assert 0 <= stats.busy_percent <= 100


def test_a_long_pass_made_of_parts_keeps_the_heartbeats_going(backends: Backends) -> None:
    """A pass of long texts on a CPU takes many seconds, a part (a chunk of the pass) at a
    time: while parts finish, the worker is alive and says so; the supervisor kills a worker
    silent for 30 heartbeats."""
    model = GatedModel()
    model.part_s = [0.1] * 12  # 1.2 s, a part every 0.1 s
    router = backends.start(max_batch=64, model=model, heartbeat_s=0.05)
    router.send_pairs(("a", "b"))
    wait_until(lambda: model.passes == [2], "the pass to start")
    time.sleep(0.3)  # past the heartbeat interval: only the parts show it is alive
    while router.sock.poll(0):
        router.read()
    beats = 0
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        if router.sock.poll(50):
            beats += router.read()[1] == protocol.W_HEARTBEAT
    assert beats >= 3, f"{beats} heartbeats in 0.6 s of a pass making progress"
    router.replies(1)


def test_after_sigterm_requests_sent_late_stay_unread_without_a_busy_loop(
        backends: Backends, monkeypatch: pytest.MonkeyPatch) -> None:
    model = GatedModel()
    router = backends.start(max_batch=64, model=model)
    model.gate.clear()
    router.send_pairs(("a", "b"))
    wait_until(lambda: model.passes == [2], "the pass to start")
    rounds = [0]
    beat = router.loop._heartbeat_if_due

    def counted() -> None:  # once per turn of the main loop
        rounds[0] += 1
        beat()

    monkeypatch.setattr(router.loop, "_heartbeat_if_due", counted)
    router.loop.terminated = True  # what the SIGTERM handler does
    router.send_pairs(("c", "d"))  # after the stop: left for the router to re-run elsewhere
    time.sleep(0.5)
    assert rounds[0] < 20, f"{rounds[0]} turns of the main loop in 0.5 s"
    model.gate.set()
    assert [seq for message in router.replies(1) for seq, _, _ in message] == [1]
    router.thread.join(WAIT_MS / 1000)
    assert not router.thread.is_alive()


def test_a_device_thread_that_breaks_ends_the_worker_with_an_error(
    backends: Backends,
) -> None:
    model = GatedModel()
    model.rows_short = 1  # a bug: replies cannot be built from what the pass returned
    router = backends.start(max_batch=64, model=model)
    router.send_pairs(("a", "b"))
    router.thread.join(WAIT_MS / 1000)
    assert not router.thread.is_alive()
    assert isinstance(router.failure, RuntimeError)
    assert "device thread failed" in str(router.failure)


def test_a_pass_that_breaks_the_cuda_context_ends_the_worker(
        backends: Backends, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device-side assert is sticky: every later pass would fail while the worker kept
    heartbeating. After a failed pass the device is checked; a broken one ends the worker,
    which the pool replaces (and re-runs what it held)."""
    import torch

    def broken() -> None:
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", broken)
    router = backends.start(max_batch=64, model=GatedModel())
    router.send_pairs(("boom", "a"))
    router.thread.join(WAIT_MS / 1000)
    assert not router.thread.is_alive()
    assert isinstance(router.failure, RuntimeError)
    assert "device thread failed" in str(router.failure)
