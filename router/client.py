"""Python clients for protocol v1: `Client` (blocking) and `AsyncClient` (asyncio).

Both keep many requests in flight on one DEALER socket, matching replies by request_id.
Protocol errors arrive as exceptions carrying the protocol's code (`exc.code`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from router import protocol
from router.keys import ClientKeys

DEFAULT_ENDPOINT = os.environ.get(protocol.ENDPOINT_ENV, protocol.DEFAULT_ENDPOINT)
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_IN_FLIGHT = 64


class ZeroPoolError(Exception):
    """A request failed; `code` is the protocol error code."""

    code = protocol.INTERNAL

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class BadRequest(ZeroPoolError):
    code = protocol.BAD_REQUEST


class TooLarge(ZeroPoolError):
    code = protocol.TOO_LARGE


class UnknownVersion(ZeroPoolError):
    code = protocol.UNKNOWN_VERSION


class Overloaded(ZeroPoolError):
    code = protocol.OVERLOADED


class RequestTimeout(ZeroPoolError):
    code = protocol.TIMEOUT


class WorkerFailed(ZeroPoolError):
    code = protocol.WORKER_FAILED


class ShuttingDown(ZeroPoolError):
    code = protocol.SHUTTING_DOWN


class InternalError(ZeroPoolError):
    code = protocol.INTERNAL


class NoReply(ZeroPoolError):
    """No reply within the client's timeout: the pool is down, unreachable or stuck."""

    code = "no_reply"


class AuthenticationFailed(ZeroPoolError):
    """The pool refused the handshake: this client's Curve key is not allowed, the pool needs
    one and none was given, or --server-key is not the pool's. Known at once (the socket's
    monitor), not after a timeout."""

    code = "auth_failed"


ERRORS: dict[str, type[ZeroPoolError]] = {
    cls.code: cls
    for cls in (BadRequest, TooLarge, UnknownVersion, Overloaded, RequestTimeout, WorkerFailed,
                ShuttingDown, InternalError)
}


class VerdictThresholds(NamedTuple):
    """Cut points on a score: above `high` "very similar", above `low` "related"."""

    high: float
    low: float


# The seed's verdicts: above VERY_SIMILAR "very similar", above RELATED "related". They suit
# one model only; a pool says its version's own in each similarity reply (Similarity).
VERY_SIMILAR = 0.85
RELATED = 0.5
SEED_THRESHOLDS = VerdictThresholds(VERY_SIMILAR, RELATED)
VERDICT_VERY_SIMILAR, VERDICT_RELATED, VERDICT_UNRELATED = "very similar", "related", "unrelated"


def verdict(score: float, thresholds: Any = SEED_THRESHOLDS) -> str:
    """A score's verdict by `thresholds` (anything with .high and .low: VerdictThresholds,
    pool.quality.Thresholds); the seed's by default."""
    if score > thresholds.high:
        return VERDICT_VERY_SIMILAR
    if score > thresholds.low:
        return VERDICT_RELATED
    return VERDICT_UNRELATED


def reply_thresholds(body: dict[str, Any]) -> VerdictThresholds:
    """The optional "thresholds" of a similarity reply: the answering version's; the seed's
    when absent (an older pool) or not two ordered numbers in [-1, 1]."""
    value = body.get("thresholds")
    if not isinstance(value, list) or len(value) != 2:
        return SEED_THRESHOLDS
    high, low = value
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in value)
    if not numbers or not -1.0 <= low < high <= 1.0:
        return SEED_THRESHOLDS
    return VerdictThresholds(float(high), float(low))


def reply_tokens(body: dict[str, Any], texts: int) -> list[int] | None:
    """The optional "tokens" of an embed reply: one count per text; None when absent (an
    older pool) or not that many non-negative integers."""
    value = body.get("tokens")
    if not isinstance(value, list) or len(value) != texts:
        return None
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value):
        return None
    return value


@dataclass(frozen=True)
class Similarity:
    scores: list[float]
    version: str
    # The answering version's verdict thresholds (the seed's when the pool sent none).
    thresholds: VerdictThresholds = SEED_THRESHOLDS

    @property
    def verdicts(self) -> list[str]:
        """Each score's verdict, by the answering version's thresholds."""
        return [verdict(score, self.thresholds) for score in self.scores]

    def verdict(self, index: int = 0) -> str:
        return verdict(self.scores[index], self.thresholds)


@dataclass(frozen=True)
class Embeddings:
    embeddings: list[list[float]]
    dim: int
    version: str
    # Tokens per text, special tokens included: the reply's optional "tokens" key (None from
    # a pool older than that key).
    tokens: list[int] | None = None


@dataclass(frozen=True)
class Ping:
    version: str
    workers: int
    # Every version taking requests, with its ready workers ({} from an older pool).
    versions: dict[str, int] = field(default_factory=dict)


Result = Similarity | Embeddings | Ping


def encode_request(request_id: bytes, op: bytes, version: str | None, body: dict) -> list[bytes]:
    return [protocol.PROTOCOL, request_id, op, (version or "").encode(), orjson.dumps(body)]


def decode_reply(op: bytes, frames: list[bytes]) -> Result | ZeroPoolError:
    """A reply's frames (after any envelope) as a result, or the error it carries."""
    if len(frames) != 4 or frames[0] != protocol.PROTOCOL:
        return InternalError(f"malformed reply ({len(frames)} frames)")
    status, body = frames[2], orjson.loads(frames[3])
    if status != protocol.STATUS_OK:
        code = body.get("code", protocol.INTERNAL)
        return ERRORS.get(code, ZeroPoolError)(body.get("message", ""), code)
    if op == protocol.OP_SIMILARITY:
        return Similarity(body["scores"], body["version"], reply_thresholds(body))
    if op == protocol.OP_EMBED:
        return Embeddings(body["embeddings"], body["dim"], body["version"],
                          reply_tokens(body, len(body["embeddings"])))
    versions = body.get("versions")
    return Ping(body["version"], body["workers"],
                dict(versions) if isinstance(versions, dict) else {})


def similarity_body(pairs: Iterable[Sequence[str]], timeout_ms: int | None) -> dict:
    body: dict[str, Any] = {"pairs": [list(pair) for pair in pairs]}
    if timeout_ms is not None:
        body["timeout_ms"] = timeout_ms
    return body


def embed_body(texts: Iterable[str], timeout_ms: int | None) -> dict:
    body: dict[str, Any] = {"texts": list(texts)}
    if timeout_ms is not None:
        body["timeout_ms"] = timeout_ms
    return body


def _raise_or_return(result: Result | ZeroPoolError) -> Any:
    if isinstance(result, ZeroPoolError):
        raise result
    return result


Endpoints = str | Sequence[str]


def split_endpoints(endpoint: Endpoints) -> list[str]:
    """One endpoint, a comma-separated string of them, or a sequence."""
    items = endpoint.split(",") if isinstance(endpoint, str) else list(endpoint)
    endpoints = [e.strip() for e in items if e.strip()]
    if not endpoints:
        raise ValueError("no endpoint given")
    return endpoints


def connect_dealer(sock: zmq.Socket, endpoint: Endpoints, curve: ClientKeys | None) -> str:
    """Connect to one pool, or to several: the DEALER then spreads requests round-robin.

    With several pools, ZMQ_IMMEDIATE keeps requests off pools that are not connected (down
    or restarting): they go to the others instead of waiting for a reconnect.
    """
    endpoints = split_endpoints(endpoint)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.apply(sock)
    if len(endpoints) > 1:
        sock.setsockopt(zmq.IMMEDIATE, 1)
    for one in endpoints:
        sock.connect(one)
    return ",".join(endpoints)


# What the socket monitor reports of a handshake.
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
HANDSHAKE_EVENTS = HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED


class HandshakeWatch:
    """A DEALER's handshakes with its pools, read from its socket monitor: refused while
    every pool it has tried refused it, and none let it in."""

    def __init__(self, sock: zmq.Socket, endpoints: int, curve: ClientKeys | None) -> None:
        self.monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
        self.endpoints = endpoints
        self.curve = curve
        self.last: dict[bytes, tuple[int, int]] = {}  # endpoint -> its latest (event, value)

    def drain(self) -> None:
        """Every event waiting on the monitor (blocking client)."""
        while True:
            try:
                frames = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.take_frames(frames)

    def take_frames(self, frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)
        self.last[event["endpoint"]] = (event["event"], event["value"])

    def refused(self) -> AuthenticationFailed | None:
        failed = [(e, v, where) for where, (e, v) in self.last.items() if e & HANDSHAKE_FAILED]
        if len(failed) < self.endpoints or len(failed) < len(self.last):
            return None  # a pool not tried yet, or one that let it in
        event, value, where = failed[0]
        return AuthenticationFailed(self._why(event, value, where.decode(errors="replace")))

    def _why(self, event: int, value: int, where: str) -> str:
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"{where} refused this client's Curve key (ZAP {value}): it is not among "
                    "the pool's allowed keys (--curve-allow)")
        if self.curve is None:
            return (f"the handshake with {where} failed: the pool requires CurveZMQ; give "
                    "--server-key (its public key) and --client-key (an allowed secret key)")
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            return (f"the handshake with {where} failed (protocol error {value:#x}): does the "
                    "pool use CurveZMQ?")
        return (f"the CurveZMQ handshake with {where} failed: is --server-key the pool's "
                "public key?")

    def close(self) -> None:
        self.monitor.close(linger=0)


class Client:
    """Blocking client. Not thread-safe (one socket); use one per thread or `AsyncClient`.

    `endpoint` may name several pools (a list, or "tcp://a:5555,tcp://b:5555"): requests are
    spread over the connected ones.
    """

    def __init__(self, endpoint: Endpoints = DEFAULT_ENDPOINT,
                 timeout: float = DEFAULT_TIMEOUT_S, context: zmq.Context | None = None,
                 curve: ClientKeys | None = None) -> None:
        self.timeout = timeout
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        # Watched before connecting, so that the first handshake is seen.
        self._handshakes = HandshakeWatch(self._sock, len(split_endpoints(endpoint)), curve)
        self.endpoint = connect_dealer(self._sock, endpoint, curve)
        self._ids = itertools.count(1)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._handshakes.monitor, zmq.POLLIN)

    def similarity(self, pairs: Iterable[Sequence[str]], version: str | None = None,
                   timeout: float | None = None, timeout_ms: int | None = None) -> Similarity:
        body = similarity_body(pairs, timeout_ms)
        return _raise_or_return(self._call(protocol.OP_SIMILARITY, version, [body], timeout)[0])

    def embed(self, texts: Iterable[str], version: str | None = None,
              timeout: float | None = None, timeout_ms: int | None = None) -> Embeddings:
        body = embed_body(texts, timeout_ms)
        return _raise_or_return(self._call(protocol.OP_EMBED, version, [body], timeout)[0])

    def ping(self, version: str | None = None, timeout: float | None = None) -> Ping:
        return _raise_or_return(self._call(protocol.OP_PING, version, [{}], timeout)[0])

    def similarity_many(self, batches: Iterable[Iterable[Sequence[str]]],
                        version: str | None = None, in_flight: int = DEFAULT_IN_FLIGHT,
                        timeout: float | None = None) -> list[Similarity | ZeroPoolError]:
        """Many similarity requests pipelined; errors are returned in place, not raised."""
        bodies = [similarity_body(pairs, None) for pairs in batches]
        return self._call(protocol.OP_SIMILARITY, version, bodies, timeout, in_flight)

    def _call(self, op: bytes, version: str | None, bodies: list[dict],
              timeout: float | None, in_flight: int = 1) -> list[Any]:
        """Send `bodies` keeping at most `in_flight` outstanding; results in input order."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        results: list[Any] = [None] * len(bodies)
        waiting: dict[bytes, int] = {}
        sent = 0
        while sent < len(bodies) or waiting:
            while sent < len(bodies) and len(waiting) < in_flight:
                # Writable once a pool is connected (with several pools and none up, never).
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._refused() or \
                        not self._sock.poll(int(remaining * 1000) + 1, zmq.POLLOUT):
                    break
                rid = next(self._ids).to_bytes(8, "big")
                self._sock.send_multipart(encode_request(rid, op, version, bodies[sent]),
                                          zmq.NOBLOCK)
                waiting[rid] = sent
                sent += 1
            unanswered = [*waiting.values(), *range(sent, len(bodies))]
            refused = self._refused()
            if refused is not None:
                for index in unanswered:
                    results[index] = refused
                break
            if sent < len(bodies) and not waiting:
                for index in unanswered:
                    results[index] = NoReply(f"no pool reachable at {self.endpoint}")
                break
            remaining = deadline - time.monotonic()
            ready = dict(self._poller.poll(int(remaining * 1000) + 1)) if remaining > 0 else {}
            if self._sock not in ready:
                if self._handshakes.monitor in ready:
                    continue  # a handshake's news: judged at the top
                for index in unanswered:
                    results[index] = NoReply(f"no reply from {self.endpoint} in time")
                break
            frames = self._sock.recv_multipart()
            index = waiting.pop(frames[1], None) if len(frames) > 1 else None
            if index is not None:  # a stray reply to an earlier, timed-out call is dropped
                results[index] = decode_reply(op, frames)
        return results

    def _refused(self) -> AuthenticationFailed | None:
        self._handshakes.drain()
        return self._handshakes.refused()

    def close(self) -> None:
        self._handshakes.close()
        self._sock.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client: any number of concurrent calls share one DEALER socket."""

    def __init__(self, endpoint: Endpoints = DEFAULT_ENDPOINT,
                 timeout: float = DEFAULT_TIMEOUT_S,
                 context: zmq.asyncio.Context | None = None,
                 curve: ClientKeys | None = None) -> None:
        self.timeout = timeout
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._handshakes = HandshakeWatch(self._sock, len(split_endpoints(endpoint)), curve)
        self.endpoint = connect_dealer(self._sock, endpoint, curve)
        self._ids = itertools.count(1)
        self._pending: dict[bytes, tuple[bytes, asyncio.Future]] = {}
        self._reader: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None

    async def similarity(self, pairs: Iterable[Sequence[str]], version: str | None = None,
                         timeout: float | None = None,
                         timeout_ms: int | None = None) -> Similarity:
        body = similarity_body(pairs, timeout_ms)
        return await self._call(protocol.OP_SIMILARITY, version, body, timeout)

    async def embed(self, texts: Iterable[str], version: str | None = None,
                    timeout: float | None = None, timeout_ms: int | None = None) -> Embeddings:
        body = embed_body(texts, timeout_ms)
        return await self._call(protocol.OP_EMBED, version, body, timeout)

    async def ping(self, version: str | None = None, timeout: float | None = None) -> Ping:
        return await self._call(protocol.OP_PING, version, {}, timeout)

    async def _call(self, op: bytes, version: str | None, body: dict,
                    timeout: float | None) -> Any:
        if self._reader is None:
            loop = asyncio.get_running_loop()
            self._reader = loop.create_task(self._read_replies())
            self._watcher = loop.create_task(self._watch_handshakes())
        refused = self._handshakes.refused()
        if refused is not None:
            raise refused
        rid = next(self._ids).to_bytes(8, "big")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[rid] = (op, future)
        limit = timeout if timeout is not None else self.timeout

        async def send_and_wait() -> Any:
            await self._sock.send_multipart(encode_request(rid, op, version, body))
            return await future

        try:
            # The send waits while no pool is connected (several pools, all down): bounded too.
            result = await asyncio.wait_for(send_and_wait(), limit)
        except asyncio.TimeoutError:
            raise NoReply(f"no reply from {self.endpoint} in time") from None
        finally:
            self._pending.pop(rid, None)
        return _raise_or_return(result)

    async def _read_replies(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            entry = self._pending.get(frames[1]) if len(frames) > 1 else None
            if entry is not None and not entry[1].done():
                entry[1].set_result(decode_reply(entry[0], frames))

    async def _watch_handshakes(self) -> None:
        """A refused handshake fails every call waiting, at once."""
        while True:
            self._handshakes.take_frames(await self._handshakes.monitor.recv_multipart())
            refused = self._handshakes.refused()
            if refused is None:
                continue
            for _, future in list(self._pending.values()):
                if not future.done():
                    future.set_result(refused)

    async def close(self) -> None:
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._handshakes.close()
        self._sock.close(linger=0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
