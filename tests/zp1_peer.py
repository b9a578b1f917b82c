"""A fake pool for client-side tests: a ROUTER on 127.0.0.1 speaking protocol v1, in a thread.

It answers similarity with `version` = the first text of the first pair (so a test can tell
which call a reply belongs to), embed with one vector per text, ping with its own `name`;
after `delays[first text]` seconds (0 by default). `answer` overrides a reply: it gets the
op and the first text and returns (status, body), or None for the usual one. A `silent`
peer answers nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import zmq

Answer = Callable[[bytes, str], tuple[bytes, bytes] | None]


class ZP1Peer:
    def __init__(self, name: str = "v1", delays: dict[str, float] | None = None,
                 answer: Answer | None = None, host: str = "127.0.0.1",
                 port: int | None = None, silent: bool = False) -> None:
        self.name = name
        self.delays = delays or {}
        self.answer = answer
        self.silent = silent
        self.received: list[tuple[bytes, bytes, str]] = []  # (op, version, first text)
        self._sock = zmq.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if port is None:
            self.port = self._sock.bind_to_random_port(f"tcp://{host}")
        else:
            self._sock.bind(f"tcp://{host}:{port}")
            self.port = port
        self.endpoint = f"tcp://{host}:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def texts(self) -> list[str]:
        return [text for _, _, text in self.received]

    def _run(self) -> None:
        due: list[tuple[float, list[bytes]]] = []
        while not self._stop.is_set():
            if self._sock.poll(5):
                frames = self._sock.recv_multipart()
                text = first_text(frames[5])
                self.received.append((frames[3], frames[4], text))
                due.append((time.monotonic() + self.delays.get(text, 0.0), frames))
            now = time.monotonic()
            for item in [d for d in due if d[0] <= now]:
                due.remove(item)
                self._reply(item[1])
        self._sock.close(linger=0)

    def _reply(self, frames: list[bytes]) -> None:
        if self.silent:
            return
        ident, _tag, rid, op, _version, body = frames
        text = first_text(body)
        reply = self.answer(op, text) if self.answer is not None else None
        status, out = reply or (b"ok", self._ok_body(op, text))
        self._sock.send_multipart([ident, b"ZP1", rid, status, out])

    def _ok_body(self, op: bytes, text: str) -> bytes:
        if op == b"ping":
            return orjson.dumps({"version": self.name, "workers": 1})
        if op == b"embed":
            return orjson.dumps({"embeddings": [[1.0, 0.0]], "dim": 2, "version": self.name})
        return orjson.dumps({"scores": [0.5], "version": text})

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def __enter__(self) -> ZP1Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def first_text(body: bytes) -> str:
    """The first text of a similarity or embed body ("" for anything else)."""
    try:
        doc: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(doc, dict):
        return ""
    if doc.get("pairs"):
        return str(doc["pairs"][0][0])
    if doc.get("texts"):
        return str(doc["texts"][0])
    return ""


def within(seconds: float, work: Callable[[], Any]) -> Any:
    """`work()`'s result (or exception), failing the test if it takes longer than `seconds`
    (run in a daemon thread, so a hang under test does not hang the suite)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as exc:  # handed to the test's thread as is
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
