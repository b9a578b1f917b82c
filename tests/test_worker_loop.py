"""The worker loop in this process on the echo model (no torch), behind a real ROUTER socket
standing in for the router: how router messages of many requests become batches and reply
messages."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import zmq

from pool.config import PoolSettings
from pool.worker import WorkerConfig, WorkerLoop
from router import protocol

WAIT_MS = 10_000


class Router:
    """The test's side of the backend: sends request messages, reads reply messages."""

    def __init__(self, ctx: zmq.Context, max_batch: int) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("inproc://backend")
        worker_sock = ctx.socket(zmq.DEALER)
        worker_sock.setsockopt(zmq.LINGER, 0)
        worker_sock.setsockopt(zmq.IDENTITY, b"w1")
        worker_sock.connect("inproc://backend")
        settings = PoolSettings(path="-", state_dir=Path("-"), model="echo",
                                max_batch=max_batch, max_wait_ms=0)
        cfg = WorkerConfig("w1", "v1", "-", "cpu", settings, heartbeat_s=60)
        self.loop = WorkerLoop(cfg, worker_sock, parent=os.getppid())
        self.thread = threading.Thread(target=self._run_worker, daemon=True)
        self.thread.start()
        assert self.read()[1] == protocol.W_READY
        self.seq = 0

    def _run_worker(self) -> None:
        try:
            self.loop.run()
        finally:
            self.loop.sock.close(linger=0)

    def send(self, bodies: list[bytes]) -> list[bytes]:
        """One W_REQUEST message carrying `bodies`; their seqs as the worker echoes them."""
        frames, seqs = [b"w1", protocol.W_REQUEST], []
        for body in bodies:
            self.seq += 1
            head = protocol.request_head(self.seq, time.monotonic_ns(), protocol.OP_SIMILARITY)
            frames += (head, body)
            seqs.append(head[:protocol.SEQ_BYTES])
        self.sock.send_multipart(frames)
        return seqs

    def read(self) -> list[bytes]:
        assert self.sock.poll(WAIT_MS), "the worker sent nothing"
        return self.sock.recv_multipart()

    def replies(self, count: int) -> list[list[tuple[int, bytes, dict]]]:
        """Reply messages until `count` replies came: per message, (seq, status, body)."""
        messages, seen = [], 0
        while seen < count:
            frames = self.read()
            if frames[1] != protocol.W_REPLY:
                continue  # a heartbeat
            message = []
            for head, body in zip(frames[2::2], frames[3::2], strict=True):
                seq, status = protocol.split_reply_head(head)
                message.append((seq, status, orjson.loads(body)))
            messages.append(message)
            seen += len(message)
        return messages

    def stop(self) -> None:
        self.sock.send_multipart([b"w1", protocol.W_STOP])
        self.thread.join(timeout=WAIT_MS / 1000)
        assert not self.thread.is_alive(), "the worker did not stop"


@pytest.fixture
def router() -> Iterator[Router]:
    ctx = zmq.Context()
    router = Router(ctx, max_batch=2)
    yield router
    if router.thread.is_alive():
        router.stop()
    router.sock.close(linger=0)
    ctx.term()


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
