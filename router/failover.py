"""Failover over several pools, without any I/O: which pool a request goes to, when it is
sent again, and what its caller finally gets.

router.client drives a `Dispatcher` with real sockets (one DEALER per pool); the unit tests
drive it with a fake clock. Everything here runs on the client's one thread or event loop.

The rules (docs/protocol.md, "Failover over several pools"):
- a request goes to the usable pool with the fewest requests in flight (ties in turn);
- it is sent again, to another pool when there is one, when its pool disconnects (a crash,
  a reset, or heartbeats unanswered: a partition) or answers a retryable code, at most
  `max_attempts` sends and never past the caller's deadline;
- each send has its own request_id, so a late reply to an earlier send is unknown and dropped:
  a caller gets exactly one result;
- a pool that failed is down for a backoff, then takes one request at a time until one is
  answered;
- a send unanswered for `attempt_timeout_s` (a pool that is up, answers heartbeats, and
  computes nothing: stuck) counts as that pool failing: the call goes to another pool.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import socket
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from router import protocol

# Codes a pool answers without having computed anything, so another pool may: the pool is
# stopping, or its queue is full. The requests are idempotent (similarity, embed, ping).
RETRYABLE_CODES = frozenset({protocol.SHUTTING_DOWN, protocol.OVERLOADED})
DNS_SCHEME = "dns://"


@dataclass(frozen=True)
class FailoverPolicy:
    """How hard a client tries, and how it watches its pools."""

    max_attempts: int = 3  # sends per call, the first included
    backoff_s: float = 0.5  # a failed pool's first rest; doubled per failure in a row
    max_backoff_s: float = 10.0
    # ZMTP heartbeats: a connection whose pool answers nothing (not even a PING) for
    # heartbeat_timeout_ms is dropped, which the socket monitor reports as DISCONNECTED.
    # A partition is noticed within interval + timeout (3.5 s), inside issue #17's
    # "heartbeat timeout + 1 s"; a PING every 0.5 s per idle pool costs nothing measurable.
    heartbeat_ivl_ms: int = 500
    heartbeat_timeout_ms: int = 3000
    heartbeat_ttl_ms: int = 10_000  # the pool drops our connection after that much silence
    # A reconnect to an unreachable host gives up after this and tries again (else the
    # kernel's SYN retries would keep one attempt hanging for minutes).
    connect_timeout_ms: int = 2000
    resolve_every_s: float = 5.0  # dns:// names are looked up again this often
    # A stuck pool answers heartbeats but no requests; its own limits answer `timeout` after
    # its queue timeout (30 s), too late for most callers. Long enough that only a pool far
    # behind is left (with the 30 s default deadline, a call is sent at most twice for it):
    # shorter would multiply the load of a fleet that is merely slow. None: the deadline.
    attempt_timeout_s: float | None = 15.0

    def backoff(self, failures: int) -> float:
        """The rest after `failures` failures in a row (≥ 1)."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, failures - 1))


# A short pause for a pool whose socket refused a send (its pipe is full or not attached yet):
# not a failure, just not now.
SEND_REFUSED_PAUSE_S = 0.05


@dataclass
class PoolState:
    """What the client knows of one pool."""

    endpoint: str
    connected: bool = False
    in_flight: int = 0
    failures: int = 0  # in a row; 0: healthy
    down_until: float = 0.0
    why: str = "not connected yet"  # the latest trouble, for NoReply's message
    retiring: bool = False  # gone from DNS: no new requests, closed once idle
    refused: bool = False  # its handshake refused us (Curve)

    def usable(self, now: float) -> bool:
        if not self.connected or self.retiring or now < self.down_until:
            return False
        # After a failure the pool is probed: one request at a time until one is answered.
        return self.failures == 0 or self.in_flight == 0

    def describe(self) -> str:
        if self.connected and self.failures == 0:
            return f"{self.endpoint} (up)"
        return f"{self.endpoint} ({self.why})"


@dataclass(eq=False, slots=True)
class Call:
    """One caller's request, across however many sends it takes."""

    op: bytes
    version: bytes
    body: bytes  # encoded once, sent as is by every attempt
    deadline: float  # monotonic
    index: int = 0  # the caller's own bookkeeping (position in a batch)
    tried: list[tuple[str, str]] = field(default_factory=list)  # (endpoint, what happened)
    rid: bytes | None = None  # the request_id of the send in flight
    pool: str | None = None  # where that send went
    sent_at: float = 0.0  # when (monotonic)
    result: Any = None  # a Result, or the ZeroPoolError to raise
    done: bool = False

    def frames(self) -> list[bytes]:
        assert self.rid is not None
        return [protocol.PROTOCOL, self.rid, self.op, self.version, self.body]


Decode = Callable[[bytes, list[bytes]], Any]
NoReplyFactory = Callable[[str], Any]


class Dispatcher:
    """Pools, calls and the rules between them. Time comes in as `now` (monotonic seconds).

    `failover=False` is a lone static endpoint, as the client always was: its socket queues
    requests until it connects, nothing is sent twice, and a disconnect fails nothing early.
    """

    def __init__(self, policy: FailoverPolicy, failover: bool, decode: Decode,
                 no_reply: NoReplyFactory) -> None:
        self.policy = policy
        self.failover = failover
        self.decode = decode
        self.no_reply = no_reply
        self.pools: dict[str, PoolState] = {}
        self.waiting: deque[Call] = deque()  # calls no pool has taken yet
        self.sent: dict[bytes, Call] = {}  # request_id of the send in flight -> its call
        self.finished: list[Call] = []  # done since the driver last took them
        self._ids = itertools.count(1)
        self._turn = itertools.count()
        # No open call's deadline is earlier (it may be later: calls that ended early are
        # not taken out), so expire() scans only when something may be due.
        self._next_deadline = math.inf

    # -- pools -------------------------------------------------------------------------------

    def add_pool(self, endpoint: str) -> PoolState:
        pool = self.pools.get(endpoint)
        if pool is None:
            # Without failover the socket queues until connected: usable from the start.
            pool = self.pools[endpoint] = PoolState(endpoint, connected=not self.failover)
        pool.retiring = False
        return pool

    def retire_pool(self, endpoint: str) -> None:
        """Gone from DNS: no new requests; its socket closes once its in-flight ones end."""
        pool = self.pools.get(endpoint)
        if pool is not None:
            pool.retiring = True

    def closable(self) -> list[str]:
        """Retired pools with nothing in flight: their sockets may close now."""
        done = [p.endpoint for p in self.pools.values() if p.retiring and p.in_flight == 0]
        for endpoint in done:
            del self.pools[endpoint]
        return done

    def on_connected(self, endpoint: str) -> None:
        pool = self.pools.get(endpoint)
        if pool is not None:
            pool.connected, pool.refused = True, False

    def on_connect_retried(self, endpoint: str, why: str) -> None:
        pool = self.pools.get(endpoint)
        if pool is not None and not pool.connected:
            pool.why = why

    def on_disconnected(self, endpoint: str, why: str, now: float) -> None:
        """The pool's connection is gone: replies to what it held can no longer come back."""
        pool = self.pools.get(endpoint)
        if pool is None or not self.failover:
            return  # a lone endpoint reconnects by itself; its caller's deadline decides
        had_work = pool.in_flight > 0
        was_connected = pool.connected
        pool.connected = False
        pool.why = why
        if had_work or was_connected:
            self._mark_failed(pool, why, now)
        for call in [c for c in self.sent.values() if c.pool == endpoint]:
            self._take_back(call, why, now)

    def on_refused(self, endpoint: str, why: str, now: float) -> None:
        """Its handshake refused us (Curve): as a disconnect, and remembered."""
        pool = self.pools.get(endpoint)
        if pool is not None:
            pool.refused = True
            self.on_disconnected(endpoint, why, now)

    def all_refused(self) -> bool:
        return bool(self.pools) and all(p.refused for p in self.pools.values())

    def _mark_failed(self, pool: PoolState, why: str, now: float) -> None:
        pool.failures += 1
        pool.why = why
        pool.down_until = now + self.policy.backoff(pool.failures)

    # -- calls -------------------------------------------------------------------------------

    def submit(self, call: Call) -> None:
        self.waiting.append(call)
        self._next_deadline = min(self._next_deadline, call.deadline)

    def choose(self, call: Call, now: float) -> PoolState | None:
        """The least loaded usable pool, preferring those this call has not tried; ties are
        taken in turn, so that one request at a time still spreads. (One pass, no lists:
        this runs for every request.)"""
        pools = list(self.pools.values())
        if not pools:
            return None
        tried = {endpoint for endpoint, _ in call.tried} if call.tried else ()
        start = next(self._turn) % len(pools)
        best: PoolState | None = None
        best_key = (True, 0)
        for pool in itertools.chain(pools[start:], pools[:start]):
            if not pool.usable(now):
                continue
            key = (pool.endpoint in tried, pool.in_flight)
            if best is None or key < best_key:
                best, best_key = pool, key
        return best

    def place(self, now: float) -> list[tuple[str, list[bytes]]]:
        """Give waiting calls to pools; the sends to make, as (endpoint, frames)."""
        sends: list[tuple[str, list[bytes]]] = []
        while self.waiting:
            call = self.waiting[0]
            pool = self.choose(call, now)
            if pool is None:
                break  # nothing usable now: they wait for a pool, or their deadline
            self.waiting.popleft()
            call.rid, call.pool = next(self._ids).to_bytes(8, "big"), pool.endpoint
            call.sent_at = now
            pool.in_flight += 1
            self.sent[call.rid] = call
            self._next_deadline = min(self._next_deadline, self._due(call))
            sends.append((pool.endpoint, call.frames()))
        return sends

    def unsent(self, endpoint: str, rid: bytes, now: float) -> None:
        """The pool's socket refused the send (not connected after all, or full): the call
        goes back to the front of the queue, and the pool rests a moment."""
        call = self.sent.pop(rid, None)
        pool = self.pools.get(endpoint)
        if pool is not None:
            pool.in_flight -= 1
            pool.down_until = max(pool.down_until, now + SEND_REFUSED_PAUSE_S)
        if call is not None:
            call.rid = call.pool = None
            self.waiting.appendleft(call)

    def on_reply(self, endpoint: str, frames: list[bytes], now: float) -> None:
        """A reply from `endpoint`; one to a send no longer in flight is dropped."""
        call = self.sent.get(frames[1]) if len(frames) > 1 else None
        if call is None or call.pool != endpoint:
            return  # late: its call was answered, sent elsewhere, or given up
        del self.sent[frames[1]]
        pool = self.pools[endpoint]
        pool.in_flight -= 1
        result = self.decode(call.op, frames)
        code = getattr(result, "code", None)
        if self.failover and code in RETRYABLE_CODES:
            why = f"answered {code}"
            self._mark_failed(pool, why, now)
            call.rid = call.pool = None
            self._retry_or_finish(call, endpoint, why, result, now)
            return
        pool.failures, pool.why = 0, ""
        call.tried.append((endpoint, "answered"))
        self._finish(call, result)

    def _take_back(self, call: Call, why: str, now: float) -> None:
        """A send whose pool was lost: the call is sent again, or given up."""
        assert call.rid is not None and call.pool is not None
        del self.sent[call.rid]
        endpoint = call.pool
        self.pools[endpoint].in_flight -= 1
        call.rid = call.pool = None
        self._retry_or_finish(call, endpoint, why, None, now)

    def _retry_or_finish(self, call: Call, endpoint: str, why: str, error: Any,
                         now: float) -> None:
        call.tried.append((endpoint, why))
        if len(call.tried) < self.policy.max_attempts and now < call.deadline:
            self.waiting.appendleft(call)  # it has waited longest: first to go again
            return
        if error is not None:  # the last pool's own answer (Overloaded, ShuttingDown)
            error.message = f"{error.message} (tried {self._tried_text(call)})"
            self._finish(call, error)
        else:
            self._finish(call, self.no_reply(
                f"no pool answered after {len(call.tried)} attempts: {self._tried_text(call)}"))

    def expire(self, now: float) -> None:
        """Calls past their deadline get NoReply, naming every pool and why it failed; sends
        unanswered past the attempt timeout go to another pool."""
        if now < self._next_deadline:
            return
        late = [c for c in self._open_calls() if c.deadline <= now]
        for call in late:
            self.give_up(call, now)
        timeout = self.policy.attempt_timeout_s
        if self.failover and timeout is not None:
            for call in [c for c in self.sent.values() if now - c.sent_at >= timeout]:
                pool = self.pools[call.pool or ""]
                why = f"no answer in {timeout:g}s"
                self._mark_failed(pool, why, now)
                self._take_back(call, why, now)
        self._next_deadline = min((self._due(c) for c in self._open_calls()),
                                  default=math.inf)

    def _due(self, call: Call) -> float:
        """When `call` next needs a look: its deadline, or its send's attempt timeout."""
        timeout = self.policy.attempt_timeout_s
        if call.rid is None or not self.failover or timeout is None:
            return call.deadline
        return min(call.deadline, call.sent_at + timeout)

    def _open_calls(self) -> Iterable[Call]:
        return itertools.chain(self.waiting, self.sent.values())

    def give_up(self, call: Call, now: float) -> None:
        """The caller stopped waiting: forget the call (a late reply is dropped)."""
        if call.done:
            return
        if call.rid is not None and self.sent.pop(call.rid, None) is not None:
            pool = self.pools.get(call.pool or "")
            if pool is not None:
                pool.in_flight -= 1
            call.tried.append((call.pool or "?", "no reply in time"))
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(call)
        self._finish(call, self.no_reply(self.timeout_text(call)))

    def timeout_text(self, call: Call) -> str:
        if not self.failover:
            return f"no reply from {next(iter(self.pools), '?')} in time"
        if not call.tried:
            pools = ", ".join(p.describe() for p in self.pools.values()) or "none"
            return f"no pool could take the request in time: {pools}"
        others = [p.describe() for p in self.pools.values()
                  if p.endpoint not in {e for e, _ in call.tried}]
        text = f"no reply in time: tried {self._tried_text(call)}"
        return text + (f"; not tried: {', '.join(others)}" if others else "")

    @staticmethod
    def _tried_text(call: Call) -> str:
        return ", ".join(f"{endpoint} ({why})" for endpoint, why in call.tried)

    def _finish(self, call: Call, result: Any) -> None:
        call.result, call.done = result, True
        self.finished.append(call)

    def take_finished(self) -> list[Call]:
        done, self.finished = self.finished, []
        return done

    def fail_all(self, error: Any) -> None:
        """Every call still open ends with `error` (a refused handshake everywhere)."""
        for call in [*self.waiting, *self.sent.values()]:
            pool = self.pools.get(call.pool or "")
            if pool is not None:
                pool.in_flight -= 1
            self._finish(call, error)
        self.waiting.clear()
        self.sent.clear()

    @property
    def next_deadline(self) -> float:
        """No open call's deadline is earlier (inf when none is open)."""
        return self._next_deadline

    def next_wake(self, now: float) -> float | None:
        """When something is due without any socket event: a deadline, or a rested pool
        that waiting calls could go to."""
        times = [self._next_deadline] if self._next_deadline < math.inf else []
        if self.waiting:
            times += [p.down_until for p in self.pools.values() if p.down_until > now]
        return min(times) if times else None


# -- where the pools are -----------------------------------------------------------------------

Resolver = Callable[[str, int], list[str]]


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (A and AAAA records), in the resolver's order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[str, None] = {}
    for family, *_, address in infos:
        ip = address[0]
        seen[f"[{ip}]" if family == socket.AF_INET6 else ip] = None
    return list(seen)


def parse_dns_target(target: str) -> tuple[str, int]:
    """`dns://NAME:PORT` as (NAME, PORT)."""
    rest = target[len(DNS_SCHEME):]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{target!r}: a DNS endpoint is dns://NAME:PORT")
    return host, int(port)


def expand_targets(targets: Iterable[str], resolver: Resolver,
                   previous: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each target's endpoints: itself when static, its addresses as tcp:// when dns://.
    A name that cannot be resolved now keeps the endpoints it had (a DNS hiccup must not
    drop healthy pools)."""
    out: dict[str, list[str]] = {}
    for target in targets:
        if not target.startswith(DNS_SCHEME):
            out[target] = [target]
            continue
        host, port = parse_dns_target(target)
        try:
            out[target] = [f"tcp://{ip}:{port}" for ip in resolver(host, port)]
        except OSError:
            out[target] = previous.get(target, [])
    return out


def needs_failover(targets: list[str]) -> bool:
    """A lone static endpoint behaves as the client always did; anything more fails over."""
    return len(targets) > 1 or any(t.startswith(DNS_SCHEME) for t in targets)


# -- endpoints, checked before anything connects ------------------------------------------

TCP_SCHEME, IPC_SCHEME = "tcp://", "ipc://"
ENDPOINT_FORMS = "tcp://HOST:PORT, ipc://PATH or dns://NAME:PORT"
IPC_PATH_MAX_BYTES = 107  # a Unix socket's path (sun_path) holds 108 bytes, its NUL included


def endpoint_problem(endpoint: str) -> str | None:
    """What is wrong with one endpoint to connect to (tcp://HOST:PORT, ipc://PATH or
    dns://NAME:PORT); None when nothing is. libzmq says only "Invalid argument", and only
    once a socket connects."""
    if not endpoint:
        return f"no endpoint given; expected {ENDPOINT_FORMS}"
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        hint = f" (tcp://{endpoint}?)" if _host_port_problem(endpoint) is None else ""
        return f"no scheme; expected {ENDPOINT_FORMS}{hint}"
    if endpoint.startswith(IPC_SCHEME):
        if not rest:
            return "no socket path after ipc://"
        if len(rest.encode()) > IPC_PATH_MAX_BYTES:
            return (f"the ipc socket path is longer than {IPC_PATH_MAX_BYTES} bytes (a Unix "
                    "socket's limit)")
        return None
    if endpoint.startswith((TCP_SCHEME, DNS_SCHEME)):
        # tcp://SOURCE;HOST:PORT connects from SOURCE: the address after ";" is the pool's.
        address = rest.rsplit(";", 1)[-1] if endpoint.startswith(TCP_SCHEME) else rest
        problem = _host_port_problem(address)
        form = "tcp://HOST:PORT" if endpoint.startswith(TCP_SCHEME) else "dns://NAME:PORT"
        return None if problem is None else f"{problem}; expected {form}"
    return f"unsupported scheme {scheme}://; expected {ENDPOINT_FORMS}"


BIND_FORMS = "tcp://HOST:PORT (HOST an address, an interface or *) or ipc://PATH"


def bind_problem(endpoint: str) -> str | None:
    """What is wrong with an endpoint to listen on (tcp://HOST:PORT, HOST an address, an
    interface or *; ipc://PATH); None when nothing is. libzmq takes a port past 65,535 as
    another port, and says only "Invalid argument" for the rest."""
    if endpoint.startswith(IPC_SCHEME):
        return endpoint_problem(endpoint)
    if not endpoint.startswith(TCP_SCHEME):
        scheme, sep, _ = endpoint.partition("://")
        found = f"unsupported scheme {scheme}://" if sep else "no scheme"
        return f"{found}; expected {BIND_FORMS}"
    address = endpoint.removeprefix(TCP_SCHEME)
    host, _, port = address.rpartition(":")
    if host == "*":  # every interface: what a connect may not name, a bind may
        address = f"0.0.0.0:{port}"
    problem = _host_port_problem(address)
    return None if problem is None else f"{problem}; expected {BIND_FORMS}"


def _host_port_problem(address: str) -> str | None:
    """What is wrong with HOST:PORT (an IPv6 host in brackets) as a pool's address."""
    if address.startswith("["):
        close = address.find("]")
        if close < 0:
            return f"{address!r}: no ']' closing the IPv6 address"
        host, sep, port = address[:close + 1], address[close + 1:close + 2], address[close + 2:]
    else:
        host, sep, port = address.rpartition(":")
    if not sep:
        return f"{address!r} has no port"
    if not host or host == "*" or any(ch.isspace() or ch in "/,;" for ch in host):
        return f"{host!r} is not a host to connect to"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"port {port!r} is not a number from 1 to 65535"
    return None
