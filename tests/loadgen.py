"""A raw-DEALER load generator for tests: keeps N requests in flight until stopped, records
every reply (no zeropool client code on the request path)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import orjson
import zmq

from tests.conftest import SENTENCES


@dataclass
class Reply:
    sent: float  # monotonic
    received: float  # wall clock (time.time), comparable with the pool's timestamps
    pinned: str
    status: bytes
    body: dict
    pairs: list[list[str]]


@dataclass
class Load:
    endpoint: str
    in_flight: int = 64
    pinned: str = ""
    replies: list[Reply] = field(default_factory=list)
    sent: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 60) -> Load:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "load generator did not finish"
        return self

    def _run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        outstanding: dict[bytes, tuple[float, list[list[str]]]] = {}
        n = 0
        deadline = None
        while True:
            while not self._stop.is_set() and len(outstanding) < self.in_flight:
                pairs = [[SENTENCES[n % 8], SENTENCES[(n // 8 + 3) % 8]]]
                rid = n.to_bytes(8, "big")
                sock.send_multipart([b"ZP1", rid, b"similarity", self.pinned.encode(),
                                     orjson.dumps({"pairs": pairs})])
                outstanding[rid] = (time.monotonic(), pairs)
                n += 1
            if self._stop.is_set():
                if not outstanding:
                    break
                deadline = deadline or time.monotonic() + 60
                if time.monotonic() > deadline:
                    break  # whatever is still outstanding counts as lost
            if not sock.poll(100):
                continue
            _, rid, status, body = sock.recv_multipart()
            sent, pairs = outstanding.pop(rid)
            self.replies.append(Reply(sent, time.time(), self.pinned, status,
                                      orjson.loads(body), pairs))
        self.sent = n
        sock.close()

    # -- what happened ---------------------------------------------------------------------

    @property
    def lost(self) -> int:
        return self.sent - len(self.replies)

    def errors(self) -> list[dict]:
        return [r.body for r in self.replies if r.status != b"ok"]

    def versions(self) -> set[str]:
        return {r.body["version"] for r in self.replies if r.status == b"ok"}

    def versions_after(self, moment: float) -> set[str]:
        return {r.body["version"] for r in self.replies if r.status == b"ok" and r.sent > moment}
