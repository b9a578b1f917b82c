"""Python clients for protocol v1: `Client` (blocking) and `AsyncClient` (asyncio).

Both keep many requests in flight on one DEALER socket, matching replies by request_id.
Protocol errors arrive as exceptions carrying the protocol's code (`exc.code`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from router import protocol
from router.failover import (
    DNS_SCHEME,
    Call,
    Dispatcher,
    FailoverPolicy,
    PoolState,
    Resolver,
    expand_targets,
    needs_failover,
    resolve_addresses,
)
from router.keys import ClientKeys

DEFAULT_ENDPOINT = os.environ.get(protocol.ENDPOINT_ENV, protocol.DEFAULT_ENDPOINT)
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_IN_FLIGHT = 64


class ZeroPoolError(Exception):
    """A request failed; `code` is the protocol error code; `at`, where the pool named one
    item of the request as at fault, its place in the body (("texts", 3): texts[3]), which
    also begins `message`."""

    code = protocol.INTERNAL

    def __init__(self, message: str, code: str | None = None,
                 at: tuple[str | int, ...] | None = None) -> None:
        super().__init__(message)
        self.message, self.at = message, at
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
    return [protocol.PROTOCOL, request_id, op, (version or "").encode(), encode_body(body)]


def encode_body(body: dict) -> bytes:
    """A request body as JSON; BadRequest for what JSON cannot carry: a text of lone
    surrogates (a command-line argument of invalid UTF-8 arrives in Python as one), or not a
    str at all."""
    try:
        return orjson.dumps(body)
    except TypeError as exc:
        raise BadRequest(f"the request cannot be sent as JSON: {exc}") from None


def decode_reply(op: bytes, frames: list[bytes]) -> Result | ZeroPoolError:
    """A reply's frames (after any envelope) as a result, or the error it carries.

    Never raises: a reply it cannot read (a body that is not JSON, or lacks a key) is that
    call's InternalError. Its callers run it after the call left the dispatcher's books and
    inside a client's only reader; an exception there would lose the call, or every call.
    """
    if len(frames) != 4 or frames[0] != protocol.PROTOCOL:
        return InternalError(f"malformed reply ({len(frames)} frames)")
    try:  # one try for all (free until raised): this runs for every reply
        body = orjson.loads(frames[3])
        if frames[2] != protocol.STATUS_OK:
            return reply_error(body)
        # A body that is not an object fails at its first key (TypeError).
        if op == protocol.OP_SIMILARITY:
            return Similarity(body["scores"], body["version"], reply_thresholds(body))
        if op == protocol.OP_EMBED:
            return Embeddings(body["embeddings"], body["dim"], body["version"],
                              reply_tokens(body, len(body["embeddings"])))
        versions = body.get("versions")
        return Ping(body["version"], body["workers"],
                    dict(versions) if isinstance(versions, dict) else {})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # JSONDecodeError too
        return InternalError(f"unreadable {op.decode(errors='replace')} reply from the pool "
                             f"({type(exc).__name__}: {str(exc)[:200]})")


def reply_error(body: Any) -> ZeroPoolError:
    """An error reply's body as its exception; TypeError when it is not one."""
    code = body.get("code", protocol.INTERNAL) if isinstance(body, dict) else None
    if not isinstance(code, str):
        raise TypeError("not an error body: {\"code\": str, \"message\": str}")
    return ERRORS.get(code, ZeroPoolError)(str(body.get("message", "")), code,
                                           reply_place(body.get("at")))


def reply_place(at: Any) -> tuple[str | int, ...] | None:
    """An error body's `at` as a tuple; None when absent or not a JSON path."""
    if isinstance(at, list) and at and isinstance(at[0], str) and all(
            isinstance(key, str | int) and not isinstance(key, bool) for key in at):
        return tuple(at)
    return None


def similarity_body(pairs: Iterable[Sequence[str]], timeout_ms: int | None,
                    truncate: bool = True, prompt_name: str | None = None) -> dict:
    return with_options({"pairs": [list(pair) for pair in pairs]}, timeout_ms, truncate,
                        prompt_name)


def embed_body(texts: Iterable[str], timeout_ms: int | None, truncate: bool = True,
               prompt_name: str | None = None) -> dict:
    return with_options({"texts": list(texts)}, timeout_ms, truncate, prompt_name)


def with_options(body: dict[str, Any], timeout_ms: int | None, truncate: bool,
                 prompt_name: str | None = None) -> dict:
    """The optional keys, only where they differ from the protocol's defaults."""
    if timeout_ms is not None:
        body["timeout_ms"] = timeout_ms
    if truncate is False:  # only an explicit False: None (or anything else) is the default
        body[protocol.TRUNCATE_KEY] = False
    if prompt_name is not None:
        body[protocol.PROMPT_NAME_KEY] = prompt_name
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
    """Connect to one pool, or to several: the DEALER then spreads requests round-robin
    (the load generator's producers; `Client` fails over instead).

    With several pools, ZMQ_IMMEDIATE keeps requests off pools that are not connected (down
    or restarting): they go to the others instead of waiting for a reconnect.
    """
    # dns:// names as their addresses now (looked up once: this socket does not fail over).
    expanded = expand_targets(split_endpoints(endpoint), resolve_addresses, {})
    endpoints = [e for targets in expanded.values() for e in targets]
    if not endpoints:
        raise ValueError(f"{endpoint!r} resolves to no address")
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
# And of a connection: gone (crash, reset, heartbeats unanswered), or not reachable yet.
CONNECTION_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
MONITOR_EVENTS = HANDSHAKE_EVENTS | CONNECTION_EVENTS
# A blocking client reads its monitor only during calls. Left out: CONNECT_RETRIED, ten a
# second while a pool is down, which an idle client would pile up without end.
BLOCKING_MONITOR_EVENTS = HANDSHAKE_EVENTS | zmq.EVENT_DISCONNECTED
_monitor_ids = itertools.count()


def open_monitor(sock: zmq.Socket, events: int) -> zmq.Socket:
    """A PAIR that receives `sock`'s monitor events, its pipe without a high-water mark.

    libzmq sends monitor events from the context's I/O thread with a blocking send: a full
    pipe (events nobody reads: a client idle while a pool is down) would stop that thread,
    and with it every socket of the context, for good. So the pipe never fills; what is
    watched must be rare where it is read only now and then (BLOCKING_MONITOR_EVENTS)."""
    address = f"inproc://zeropool-monitor-{os.getpid()}-{next(_monitor_ids)}"
    sock.monitor(address, events)
    pair = sock.context.socket(zmq.PAIR)
    pair.setsockopt(zmq.LINGER, 0)
    pair.setsockopt(zmq.RCVHWM, 0)  # with the sender's, sets the inproc pipe's: 0 is none
    pair.connect(address)
    return pair


def close_monitor(sock: zmq.Socket, pair: zmq.Socket) -> None:
    """Stop monitoring `sock`, then close the PAIR, in that order: a PAIR closed first would
    block libzmq's I/O thread on the socket's next event, sent to nobody (libzmq #3575). Seen
    in this project's CI: one pytest process whose every later client stayed unconnected,
    its I/O thread (gdb) inside zmq_msg_send from the monitor."""
    if not sock.closed and not pair.closed:
        sock.monitor(None, 0)
    pair.close(linger=0)


class HandshakeWatch:
    """A DEALER's handshakes with its pools, read from its socket monitor: refused while
    every pool it has tried refused it, and none let it in."""

    def __init__(self, sock: zmq.Socket, endpoints: int, curve: ClientKeys | None,
                 events: int = HANDSHAKE_EVENTS) -> None:
        self.sock = sock
        self.monitor = open_monitor(sock, events)
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

    def take_frames(self, frames: list[bytes]) -> dict[str, Any]:
        """Record a handshake's outcome; the event, whatever it is."""
        event = parse_monitor_message(frames)
        if event["event"] & HANDSHAKE_EVENTS:
            self.last[event["endpoint"]] = (event["event"], event["value"])
        return event

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
        close_monitor(self.sock, self.monitor)

    def __del__(self) -> None:  # a client dropped without close(): the same order
        self.close()


def configure_failover_socket(sock: zmq.Socket, policy: FailoverPolicy) -> None:
    """A failover client's DEALER: requests only onto a live connection, and a silent one
    (a partition, no reset) dropped after the heartbeat timeout."""
    sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a pool that is not connected
    sock.setsockopt(zmq.HEARTBEAT_IVL, policy.heartbeat_ivl_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, policy.heartbeat_timeout_ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, policy.heartbeat_ttl_ms)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, policy.connect_timeout_ms)


class PoolSocket:
    """One pool's DEALER (owned by one client, used by its one thread or loop) and the
    monitor on it."""

    def __init__(self, ctx: zmq.Context, endpoint: str, curve: ClientKeys | None,
                 policy: FailoverPolicy, failover: bool, events: int) -> None:
        self.endpoint = endpoint
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(self.sock)
        if failover:
            configure_failover_socket(self.sock, policy)
        # Watched before connecting, so that the first handshake is seen.
        self.watch = HandshakeWatch(self.sock, 1, curve, events)
        self.sock.connect(endpoint)

    def close(self) -> None:
        self.watch.close()
        self.sock.close(linger=0)


def apply_monitor_event(core: Dispatcher, pool: PoolSocket, frames: list[bytes],
                        now: float) -> None:
    """A monitor event as the dispatcher's news of that pool."""
    kind = pool.watch.take_frames(frames)["event"]
    if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        core.on_connected(pool.endpoint)
    elif kind & HANDSHAKE_FAILED:
        refused = pool.watch.refused()
        core.on_refused(pool.endpoint, refused.message if refused else "handshake failed", now)
    elif kind == zmq.EVENT_DISCONNECTED:
        core.on_disconnected(pool.endpoint, "disconnected", now)
    elif kind == zmq.EVENT_CONNECT_RETRIED:
        core.on_connect_retried(pool.endpoint, "unreachable (connect retried)")


class PoolSet:
    """The pools a client's endpoints name, kept in step with DNS; the sockets are created
    and closed here, on the client's own thread or loop."""

    def __init__(self, endpoint: Endpoints, ctx: zmq.Context, curve: ClientKeys | None,
                 policy: FailoverPolicy | None, resolver: Resolver, events: int) -> None:
        self.targets = split_endpoints(endpoint)
        self.failover = needs_failover(self.targets)
        self.policy = policy or FailoverPolicy()
        self.core = Dispatcher(self.policy, self.failover, decode_reply, NoReply)
        self.resolver = resolver
        self.sockets: dict[str, PoolSocket] = {}
        self.expanded: dict[str, list[str]] = {}
        self.dns = any(t.startswith(DNS_SCHEME) for t in self.targets)
        self.next_resolve = 0.0
        self._ctx = ctx
        self._curve = curve
        self._events = events  # what each pool's monitor watches

    def resolve(self) -> dict[str, list[str]]:
        """Each target's endpoints now (blocking: DNS)."""
        return expand_targets(self.targets, self.resolver, self.expanded)

    def apply(self, expanded: dict[str, list[str]], resolved_at: float
              ) -> tuple[list[PoolSocket], list[PoolSocket]]:
        """Open sockets for new endpoints, retire vanished ones; (opened, closed). The next
        look-up is due `resolve_every_s` after this one's answer came (`resolved_at`)."""
        self.expanded = expanded
        self.next_resolve = resolved_at + self.policy.resolve_every_s
        wanted = list(dict.fromkeys(e for endpoints in expanded.values() for e in endpoints))
        opened = []
        for endpoint in wanted:
            if endpoint not in self.sockets:
                self.sockets[endpoint] = PoolSocket(self._ctx, endpoint, self._curve,
                                                    self.policy, self.failover, self._events)
                opened.append(self.sockets[endpoint])
            self.core.add_pool(endpoint)
        for endpoint in set(self.sockets) - set(wanted):
            self.core.retire_pool(endpoint)
        return opened, self.close_retired()

    def close_retired(self) -> list[PoolSocket]:
        """Retired pools whose in-flight requests have all ended: closed now."""
        closed = [self.sockets.pop(e) for e in self.core.closable() if e in self.sockets]
        for pool in closed:
            pool.close()
        return closed

    def send(self, sends: list[tuple[str, list[bytes]]], now: float) -> None:
        """The dispatcher's sends; one a socket refuses goes back to it."""
        for endpoint, frames in sends:
            try:
                result = self.sockets[endpoint].sock.send_multipart(frames, zmq.NOBLOCK)
                # An asyncio socket answers a non-blocking send with a finished future.
                if isinstance(result, asyncio.Future) and result.done() and \
                        result.exception() is not None:
                    raise result.exception()  # type: ignore[misc]
            except zmq.Again:
                self.core.unsent(endpoint, frames[1], now)

    def refusal(self) -> AuthenticationFailed | None:
        """AuthenticationFailed when every pool refused this client's handshake."""
        if not self.core.all_refused():
            return None
        for pool in self.sockets.values():
            refused = pool.watch.refused()
            if refused is not None:
                return refused
        return AuthenticationFailed("every pool refused the handshake")

    def close(self) -> None:
        for pool in self.sockets.values():
            pool.close()
        self.sockets.clear()


class Lookups:
    """dns:// names looked up again on a daemon thread, one look-up at a time, for a blocking
    client: getaddrinfo has no timeout of its own (resolv.conf's timeout x attempts, 10 s and
    more), so a look-up inside a call would hold it past its deadline. The answer is applied
    by the client's own thread, which alone touches its sockets."""

    def __init__(self, resolve: Callable[[], dict[str, list[str]]]) -> None:
        self._resolve = resolve
        self._thread: threading.Thread | None = None
        self._answer: dict[str, list[str]] | None = None
        self._answered_at = 0.0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Look up now, unless a look-up is already under way or its answer not taken."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="zeropool-dns", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._answer = self._resolve()
        except Exception:  # whatever the resolver raises, the pools stay as they are
            self._answer = None
        self._answered_at = time.monotonic()

    def take(self) -> tuple[dict[str, list[str]] | None, float] | None:
        """The finished look-up's (answer, when it came), once; None while none has finished.
        The answer is None when the resolver raised."""
        thread = self._thread
        if thread is None or thread.is_alive():
            return None
        self._thread = None
        answer, self._answer = self._answer, None
        return answer, self._answered_at


# While a look-up runs, a waiting call looks for its answer this often (a pool it brings may
# be the only one that can take the call).
LOOKUP_POLL_S = 0.05


class Client:
    """Blocking client. Not thread-safe (its sockets); use one per thread or `AsyncClient`.

    `endpoint` may name several pools (a list, "tcp://a:5555,tcp://b:5555", or
    "dns://NAME:PORT" for every address of a name, looked up again every 5 s): one DEALER per
    pool, each request to the least loaded live one, sent again elsewhere when its pool is
    lost or answers shutting_down / overloaded (`policy`: attempts, backoff, heartbeats).
    """

    def __init__(self, endpoint: Endpoints = DEFAULT_ENDPOINT,
                 timeout: float = DEFAULT_TIMEOUT_S, context: zmq.Context | None = None,
                 curve: ClientKeys | None = None, policy: FailoverPolicy | None = None,
                 resolver: Resolver = resolve_addresses) -> None:
        self.timeout = timeout
        self._ctx = context or zmq.Context.instance()
        self._pools = PoolSet(endpoint, self._ctx, curve, policy, resolver,
                              BLOCKING_MONITOR_EVENTS)
        self.endpoint = ",".join(self._pools.targets)
        self._poller = zmq.Poller()
        self._owner: dict[zmq.Socket, PoolSocket] = {}
        self._lookups = Lookups(self._pools.resolve)
        # The first look-up blocks: there is nothing to send to before it.
        now = time.monotonic()
        self._adopt(*self._pools.apply(self._pools.resolve(), now))

    def pools(self) -> dict[str, PoolState]:
        """What the client knows of each pool now (copies)."""
        self._take_events(time.monotonic())
        return {e: dataclasses.replace(p) for e, p in self._pools.core.pools.items()}

    def similarity(self, pairs: Iterable[Sequence[str]], version: str | None = None,
                   timeout: float | None = None, timeout_ms: int | None = None,
                   truncate: bool = True, prompt_name: str | None = None) -> Similarity:
        body = similarity_body(pairs, timeout_ms, truncate, prompt_name)
        return _raise_or_return(self._call(protocol.OP_SIMILARITY, version, [body], timeout)[0])

    def embed(self, texts: Iterable[str], version: str | None = None,
              timeout: float | None = None, timeout_ms: int | None = None,
              truncate: bool = True, prompt_name: str | None = None) -> Embeddings:
        body = embed_body(texts, timeout_ms, truncate, prompt_name)
        return _raise_or_return(self._call(protocol.OP_EMBED, version, [body], timeout)[0])

    def ping(self, version: str | None = None, timeout: float | None = None) -> Ping:
        return _raise_or_return(self._call(protocol.OP_PING, version, [{}], timeout)[0])

    def similarity_many(self, batches: Iterable[Iterable[Sequence[str]]],
                        version: str | None = None, in_flight: int = DEFAULT_IN_FLIGHT,
                        timeout: float | None = None, truncate: bool = True,
                        prompt_name: str | None = None) -> list[Similarity | ZeroPoolError]:
        """Many similarity requests pipelined; errors are returned in place, not raised."""
        bodies = [similarity_body(pairs, None, truncate, prompt_name) for pairs in batches]
        return self._call(protocol.OP_SIMILARITY, version, bodies, timeout, in_flight)

    def _call(self, op: bytes, version: str | None, bodies: list[dict],
              timeout: float | None, in_flight: int = 1) -> list[Any]:
        """Send `bodies` keeping at most `in_flight` outstanding; results in input order."""
        # Every body encoded before any is sent: bad input raises with nothing in flight.
        encoded = [encode_body(body) for body in bodies]
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        pinned = (version or "").encode()
        calls = [Call(op, pinned, body, deadline, index=i) for i, body in enumerate(encoded)]
        try:
            return self._run(calls, in_flight)
        finally:
            # However this call ends (an exception, KeyboardInterrupt), none of its requests
            # stays in the dispatcher: their replies would be counted by the next call.
            self._forget(calls)

    def _run(self, calls: list[Call], in_flight: int) -> list[Any]:
        core = self._pools.core
        results: list[Any] = [None] * len(calls)
        submitted = ended = 0
        in_flight = max(1, in_flight)
        while True:
            while submitted < len(calls) and submitted - ended < in_flight:
                core.submit(calls[submitted])
                submitted += 1
            now = time.monotonic()
            self._take_events(now)
            self._refresh(now)
            core.expire(now)
            self._pools.send(core.place(now), now)
            for call in core.take_finished():
                # Only this call's own: the dispatcher is shared with calls before it.
                if call.index < len(calls) and calls[call.index] is call:
                    results[call.index] = call.result
                    ended += 1
            if ended == len(calls):
                return results
            if submitted < len(calls) and submitted - ended < in_flight:
                continue  # replies made room: send more before waiting for any
            self._wait(core.next_wake(now), now)

    def _forget(self, calls: list[Call]) -> None:
        """Give up every call of `calls` the dispatcher still holds, and drop them from its
        finished list (the next call would ignore them; this keeps nothing alive)."""
        core = self._pools.core
        waiting = set(core.waiting)
        now = time.monotonic()
        for call in calls:
            if not call.done and (call.rid is not None or call in waiting):
                core.give_up(call, now)
        if core.finished:  # empty after a call that ended normally
            mine = set(calls)
            core.finished = [call for call in core.finished if call not in mine]

    def _wait(self, wake: float | None, now: float) -> None:
        """Until a socket has news or something is due; then take the news."""
        if self._pools.dns:
            due = now + LOOKUP_POLL_S if self._lookups.running else self._pools.next_resolve
            wake = due if wake is None else min(wake, due)
        timeout_ms = 1000 if wake is None else max(0, math.ceil((wake - now) * 1000))
        for sock, _ in self._poller.poll(timeout_ms):
            pool = self._owner.get(sock)
            if pool is not None and sock is pool.sock:
                self._take_replies(pool, time.monotonic())

    def _take_replies(self, pool: PoolSocket, now: float) -> None:
        while True:
            try:
                frames = pool.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._pools.core.on_reply(pool.endpoint, frames, now)

    def _take_events(self, now: float) -> None:
        """Every monitor event waiting: connections made, lost, refused."""
        for pool in list(self._pools.sockets.values()):
            while True:
                try:
                    frames = pool.watch.monitor.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                apply_monitor_event(self._pools.core, pool, frames, now)
        refused = self._pools.refusal()
        if refused is not None:
            self._pools.core.fail_all(refused)

    def _refresh(self, now: float) -> None:
        """A finished DNS look-up applied, the next one started when due (never waited
        for: see Lookups); sockets opened and closed to match."""
        if not self._pools.dns:
            return  # static endpoints: nothing ever opens or closes
        taken = self._lookups.take()
        if taken is None:
            self._adopt([], self._pools.close_retired())
        elif taken[0] is None:  # the resolver failed: the pools stay; try again in a while
            self._pools.next_resolve = taken[1] + self._pools.policy.resolve_every_s
        else:
            self._adopt(*self._pools.apply(*taken))
        if now >= self._pools.next_resolve:
            self._lookups.start()

    def _adopt(self, opened: list[PoolSocket], closed: list[PoolSocket]) -> None:
        """Poll the sockets of pools just opened; stop polling those just closed."""
        for pool in opened:
            for sock in (pool.sock, pool.watch.monitor):
                self._poller.register(sock, zmq.POLLIN)
                self._owner[sock] = pool
        for pool in closed:
            for sock in (pool.sock, pool.watch.monitor):
                self._poller.unregister(sock)
                self._owner.pop(sock, None)

    def close(self) -> None:
        self._pools.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client: any number of concurrent calls share its sockets (one per pool), on
    the loop that runs them. Several pools as for `Client`."""

    def __init__(self, endpoint: Endpoints = DEFAULT_ENDPOINT,
                 timeout: float = DEFAULT_TIMEOUT_S,
                 context: zmq.asyncio.Context | None = None,
                 curve: ClientKeys | None = None, policy: FailoverPolicy | None = None,
                 resolver: Resolver = resolve_addresses) -> None:
        self.timeout = timeout
        self._ctx = context or zmq.asyncio.Context.instance()
        self._pools = PoolSet(endpoint, self._ctx, curve, policy, resolver, MONITOR_EVENTS)
        self.endpoint = ",".join(self._pools.targets)
        self._pools.apply(self._pools.resolve(), time.monotonic())
        self._futures: dict[Call, asyncio.Future] = {}
        self._tasks: dict[str, list[asyncio.Task]] = {}  # per pool: its reader and watcher
        self._timer: asyncio.Task | None = None
        self._resolver: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._timer_at: float | None = None  # when the timer task wakes next
        self._closed = False

    def pools(self) -> dict[str, PoolState]:
        """What the client knows of each pool now (copies)."""
        return {e: dataclasses.replace(p) for e, p in self._pools.core.pools.items()}

    async def similarity(self, pairs: Iterable[Sequence[str]], version: str | None = None,
                         timeout: float | None = None, timeout_ms: int | None = None,
                         truncate: bool = True, prompt_name: str | None = None) -> Similarity:
        body = similarity_body(pairs, timeout_ms, truncate, prompt_name)
        return await self._call(protocol.OP_SIMILARITY, version, body, timeout)

    async def embed(self, texts: Iterable[str], version: str | None = None,
                    timeout: float | None = None, timeout_ms: int | None = None,
                    truncate: bool = True, prompt_name: str | None = None) -> Embeddings:
        body = embed_body(texts, timeout_ms, truncate, prompt_name)
        return await self._call(protocol.OP_EMBED, version, body, timeout)

    async def ping(self, version: str | None = None, timeout: float | None = None) -> Ping:
        return await self._call(protocol.OP_PING, version, {}, timeout)

    async def _call(self, op: bytes, version: str | None, body: dict,
                    timeout: float | None) -> Any:
        if self._closed:
            raise NoReply("client closed")
        self._start()
        refused = self._pools.refusal()
        if refused is not None:
            raise refused
        limit = timeout if timeout is not None else self.timeout
        now = time.monotonic()
        call = Call(op, (version or "").encode(), encode_body(body), now + limit)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._futures[call] = future
        self._pools.core.submit(call)
        self._pump()
        try:
            # The timer task ends the call at its deadline (NoReply), the one bound needed.
            result = await future
        finally:
            self._futures.pop(call, None)
            if not call.done:  # the caller was cancelled: forget its request
                self._pools.core.give_up(call, time.monotonic())
        return _raise_or_return(result)

    def _start(self) -> None:
        if self._wake is not None:
            return
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._timer = loop.create_task(self._run_timer())
        if self._pools.dns:
            self._resolver = loop.create_task(self._resolve_periodically())
        for pool in self._pools.sockets.values():
            self._watch_pool(pool)

    def _watch_pool(self, pool: PoolSocket) -> None:
        loop = asyncio.get_running_loop()
        self._tasks[pool.endpoint] = [loop.create_task(self._read_replies(pool)),
                                      loop.create_task(self._read_events(pool))]

    def _pump(self) -> None:
        """After any news: expire, send what can go, hand results to their callers."""
        core, now = self._pools.core, time.monotonic()
        core.expire(now)
        if core.waiting:
            self._pools.send(core.place(now), now)
        if core.finished:
            for call in core.take_finished():
                future = self._futures.get(call)
                if future is not None and not future.done():
                    future.set_result(call.result)
        if self._pools.dns:  # only dns:// targets retire pools
            self._close_pools(self._pools.close_retired())
        # The timer sleeps until its own plan; wake it when something is due sooner (a call
        # with an earlier deadline, calls waiting for a pool's rest to end).
        timer_at = self._timer_at
        if timer_at is None or core.waiting or core.next_deadline < timer_at:
            wake = core.next_wake(now)
            if wake is not None and (timer_at is None or wake < timer_at):
                assert self._wake is not None
                self._wake.set()

    async def _run_timer(self) -> None:
        """Deadlines and pool rests: what is due without a socket event."""
        assert self._wake is not None
        while True:
            now = time.monotonic()
            wake = self._pools.core.next_wake(now)
            self._timer_at = wake
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(),
                                       None if wake is None else max(0.0, wake - now))
            self._timer_at = None
            self._pump()

    async def _read_replies(self, pool: PoolSocket) -> None:
        core = self._pools.core
        while True:
            frames = await pool.sock.recv_multipart()
            now = time.monotonic()
            core.on_reply(pool.endpoint, frames, now)
            # The replies already waiting are taken too, then one pump for them all.
            for _ in range(REPLIES_PER_PUMP):
                if not pool.sock.get(zmq.EVENTS) & zmq.POLLIN:
                    break
                ready = pool.sock.recv_multipart(zmq.NOBLOCK)  # a finished future
                if ready.exception() is not None:
                    break
                core.on_reply(pool.endpoint, ready.result(), now)
            self._pump()

    async def _read_events(self, pool: PoolSocket) -> None:
        """Connections made, lost, refused; a refusal by every pool fails every call."""
        while True:
            frames = await pool.watch.monitor.recv_multipart()
            apply_monitor_event(self._pools.core, pool, frames, time.monotonic())
            refused = self._pools.refusal()
            if refused is not None:
                self._pools.core.fail_all(refused)
            self._pump()

    async def _resolve_periodically(self) -> None:
        """dns:// names looked up again (in an executor thread: DNS only, no socket)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._pools.policy.resolve_every_s)
            expanded = await loop.run_in_executor(None, self._pools.resolve)
            opened, closed = self._pools.apply(expanded, time.monotonic())
            for pool in opened:
                self._watch_pool(pool)
            self._close_pools(closed)
            self._pump()

    def _close_pools(self, closed: list[PoolSocket]) -> None:
        for pool in closed:
            for task in self._tasks.pop(pool.endpoint, []):
                task.cancel()

    async def close(self) -> None:
        """Stop; every call still waiting ends with NoReply("client closed") (once the
        timer is gone, nothing else would ever end it)."""
        self._closed = True
        for future in self._futures.values():
            if not future.done():
                future.set_result(NoReply("client closed"))
        tasks = [self._timer, self._resolver, *itertools.chain(*self._tasks.values())]
        for task in tasks:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._tasks.clear()
        self._pools.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


REPLIES_PER_PUMP = 64  # replies a reader takes at once before sending what can go
