"""The load generator: producers speaking protocol v1 directly on raw DEALER sockets (no
zeropool client code on the request path), or through the failover client across pools.

`run_load` drives `pool bench`. Each of its producers is its own process (the GIL must not
be the bottleneck) with one DEALER socket (or one AsyncClient, `LoadSpec.failover`) and its
share of the requests in flight. Producers stream progress to the parent every PROGRESS_S
and hand back every request's (sent time, latency, outcome, version) at the end.

`ThreadLoad` is the tests' load: one producer in a thread beside them, closed loop (N in
flight) or open loop (a rate), recording every reply whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import multiprocessing
import queue
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import zmq

from router.client import AsyncClient, ZeroPoolError, connect_dealer
from router.keys import ClientKeys
from router.protocol import INTERNAL, OK_CODE, OP_SIMILARITY, PROTOCOL, STATUS_OK

PROGRESS_S = 0.5
TAIL_TIMEOUT_S = 60.0  # after the run, how long producers wait for outstanding replies

# Bundled sample sentences (Chinese, as the seed's users send, plus some English).
SUBJECTS = ["我", "你", "他们", "我的朋友", "这位老师", "那个学生", "我们公司", "小王", "她妈妈"]
VERBS = ["喜欢", "想要", "讨厌", "正在寻找", "明天要买", "昨天看到了", "经常谈论", "不太了解"]
OBJECTS = ["北京的天气", "一家新餐厅", "股票市场", "这本小说", "去上海的机票", "那部电影",
           "新的手机", "周末的计划", "健康的饮食", "人工智能"]
ENGLISH = ["the weather today", "a new restaurant", "the stock market", "this novel",
           "a flight", "that movie", "a new phone", "weekend plans", "healthy food",
           "machine learning"]


def sample_sentences() -> list[str]:
    zh = [s + v + o for s, v, o in itertools.product(SUBJECTS, VERBS, OBJECTS)]
    en = [f"I {v} {o}" for v, o in itertools.product(
        ["like", "want", "hate", "look for", "talk about", "read about"], ENGLISH)]
    return zh + en


def make_texts(count: int, chars: int, rng: random.Random) -> list[str]:
    """`count` distinct texts: the bundled sentences, or synthetic ones of `chars` characters."""
    base = sample_sentences()
    out = []
    for i in range(count):
        if chars <= 0:
            text = base[i % len(base)]
        else:
            parts, size = [], 0
            while size < chars:
                part = rng.choice(base)
                parts.append(part)
                size += len(part) + 1
            text = "，".join(parts)[:chars]
        out.append(f"{text}{i // len(base)}" if i >= len(base) else text)
    rng.shuffle(out)
    return out


@dataclass(frozen=True)
class LoadSpec:
    endpoint: str
    concurrency: int = 64
    duration_s: float | None = 20.0
    requests: int | None = None
    pairs_per_request: int = 1
    text_chars: int = 0
    version: str = ""
    seed: int = 0
    producers: int = 2
    timeout_ms: int | None = None
    curve: ClientKeys | None = None
    failover: bool = False  # AsyncClient per producer, not a raw DEALER


@dataclass
class Samples:
    """One row per request, in send order per producer."""

    sent: np.ndarray  # monotonic seconds
    latency: np.ndarray  # seconds; NaN when no reply came
    outcome: list[str]  # "ok" or the error code, "lost" when no reply came
    version: list[str]
    cpu_s: float = 0.0  # CPU seconds the producers spent on the load
    # Monotonic seconds when every producer was ready and the load's clock started (run_load
    # sets it; one producer's part has none): the report's and the plot's time zero.
    started: float = 0.0

    @classmethod
    def concat(cls, parts: list[Samples]) -> Samples:
        return cls(np.concatenate([x.sent for x in parts]) if parts else np.empty(0),
                   np.concatenate([x.latency for x in parts]) if parts else np.empty(0),
                   [o for x in parts for o in x.outcome], [v for x in parts for v in x.version],
                   sum(x.cpu_s for x in parts))


@dataclass
class Progress:
    done: int = 0
    errors: int = 0
    recent: list[float] = field(default_factory=list)  # latencies since the last report


class Recorder:
    """One producer's record: a row per request sent (time, latency, outcome, version), and
    the progress it streams to the parent every PROGRESS_S."""

    def __init__(self, index: int, progress: multiprocessing.Queue) -> None:
        self.index, self.progress = index, progress
        self.sent: list[float] = []
        self.latency: list[float] = []
        self.outcome: list[str] = []
        self.version: list[str] = []
        self.report = Progress()
        self.next_report = time.monotonic() + PROGRESS_S
        self.cpu_start = time.process_time()

    def open(self) -> int:
        """A request sent now: its row, "lost" until it is answered."""
        self.sent.append(time.monotonic())
        self.latency.append(float("nan"))
        self.outcome.append("lost")
        self.version.append("")
        return len(self.sent) - 1

    def close(self, row: int, outcome: str, version: str) -> None:
        self.latency[row] = time.monotonic() - self.sent[row]
        self.outcome[row], self.version[row] = outcome, version
        self.report.errors += outcome != OK_CODE
        self.report.done += 1
        self.report.recent.append(self.latency[row])

    def tick(self, now: float) -> None:
        if now >= self.next_report:
            self.flush()
            self.next_report = now + PROGRESS_S

    def flush(self) -> None:
        self.progress.put((self.index, self.report.done, self.report.errors,
                           self.report.recent))
        self.report = Progress(self.report.done, self.report.errors)

    def samples(self) -> Samples:
        return Samples(np.array(self.sent), np.array(self.latency), self.outcome,
                       self.version, time.process_time() - self.cpu_start)


def request_pairs(texts: list[str], n: int, per_request: int) -> list[list[str]]:
    """Request n's pairs: consecutive texts, so every producer's requests differ."""
    return [[texts[(n * 2 + k) % len(texts)], texts[(n * 2 + k + 1) % len(texts)]]
            for k in range(per_request)]


PRODUCER_START_TIMEOUT_S = 60.0  # a spawned producer imports numpy and zmq: seconds when busy


@dataclass
class StartLine:
    """The load's clock starts once every producer is ready to send: a spawned producer takes
    0.4-0.9 s to import, and a clock started before would count that as time under load (a
    short run reporting a fraction of its throughput, --rotate-at early). Each producer sets
    its `ready` event and waits for `go`; the parent writes the shared `deadline` first."""

    ready: list[Any]  # a multiprocessing Event per producer
    go: Any  # a multiprocessing Event
    deadline: Any  # a multiprocessing RawValue("d"): monotonic seconds, the same clock here

    @classmethod
    def make(cls, mp: Any, producers: int) -> StartLine:
        return cls([mp.Event() for _ in range(producers)], mp.Event(), mp.RawValue("d", 0.0))

    def wait(self, index: int) -> float:
        """In producer `index`: ready; returns the deadline once the parent says go."""
        self.ready[index].set()
        self.go.wait()
        return float(self.deadline.value)

    def start(self, duration_s: float | None, procs: list[Any]) -> float:
        """In the parent: wait until every producer is ready, then start the clock; its start
        (monotonic). RuntimeError if one exits or PRODUCER_START_TIMEOUT_S passes first."""
        give_up = time.monotonic() + PRODUCER_START_TIMEOUT_S
        for event, proc in zip(self.ready, procs, strict=True):
            while not event.wait(0.1):
                if proc.exitcode is not None:
                    raise RuntimeError(f"producer {proc.name} exited (exit {proc.exitcode}) "
                                       "before it was ready to send")
                if time.monotonic() > give_up:
                    raise RuntimeError(f"producer {proc.name} was not ready to send within "
                                       f"{PRODUCER_START_TIMEOUT_S:.0f}s")
        start = time.monotonic()
        self.deadline.value = start + (duration_s or 1e9)
        self.go.set()
        return start


def _producer(index: int, spec: LoadSpec, share: int, quota: int | None,
              start_line: StartLine, progress: multiprocessing.Queue,
              results: multiprocessing.Queue) -> None:
    # Ctrl-C reaches the whole process group: the parent stops the producers (run_load's
    # finally), and a KeyboardInterrupt here would only print a traceback per producer.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    texts = make_texts(4096, spec.text_chars, random.Random(spec.seed * 1000 + index))
    gc.freeze()  # a collection walking the imports would show up as the pool's latency
    deadline = start_line.wait(index)

    def more(sent: int) -> bool:
        return sent < quota if quota is not None else time.monotonic() < deadline

    load = _failover_load if spec.failover else _dealer_load
    results.put((index, load(spec, share, more, texts, Recorder(index, progress))))


def _dealer_load(spec: LoadSpec, share: int, more: Callable[[int], bool],
                 texts: list[str], record: Recorder) -> Samples:
    """`share` requests in flight on one raw DEALER (round-robin over several pools): a
    request whose pool dies stays "lost"."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    connect_dealer(sock, spec.endpoint, spec.curve)
    rows: dict[bytes, int] = {}
    n = 0

    def send() -> None:
        nonlocal n
        body: dict = {"pairs": request_pairs(texts, n, spec.pairs_per_request)}
        if spec.timeout_ms:
            body["timeout_ms"] = spec.timeout_ms
        rid = n.to_bytes(8, "little")
        rows[rid] = record.open()
        sock.send_multipart([PROTOCOL, rid, OP_SIMILARITY, spec.version.encode(),
                             orjson.dumps(body)])
        n += 1

    while len(rows) < share and more(n):
        send()
    tail_deadline: float | None = None
    while rows:
        now = time.monotonic()
        record.tick(now)
        if not more(n):
            tail_deadline = tail_deadline or now + TAIL_TIMEOUT_S
            if now > tail_deadline:
                break  # what is still outstanding stays "lost"
        if not sock.poll(100):
            continue
        _, rid, status, body = sock.recv_multipart()
        row = rows.pop(rid, None)
        if row is None:
            continue
        doc = orjson.loads(body)
        if status == STATUS_OK:
            record.close(row, OK_CODE, doc.get("version", ""))
        else:
            record.close(row, doc.get("code", INTERNAL), "")
        if more(n):
            send()
    record.flush()
    sock.close(linger=0)
    ctx.term()
    return record.samples()


def _failover_load(spec: LoadSpec, share: int, more: Callable[[int], bool],
                   texts: list[str], record: Recorder) -> Samples:
    """`share` calls in flight through one AsyncClient, as a fleet's producers run: the
    least loaded pool first, a call whose pool dies or refuses it sent again elsewhere; a
    call counts as failed only with the client's exception, after TAIL_TIMEOUT_S at most."""
    n = 0

    async def caller(client: AsyncClient) -> None:
        nonlocal n
        while more(n):
            pairs, row = request_pairs(texts, n, spec.pairs_per_request), record.open()
            n += 1
            try:
                result = await client.similarity(pairs, version=spec.version or None,
                                                 timeout_ms=spec.timeout_ms)
                record.close(row, OK_CODE, result.version)
            except ZeroPoolError as exc:
                record.close(row, exc.code, "")

    async def report() -> None:
        while True:
            record.tick(time.monotonic())
            await asyncio.sleep(PROGRESS_S / 2)

    async def run() -> None:
        async with AsyncClient(spec.endpoint, timeout=TAIL_TIMEOUT_S, curve=spec.curve) as client:
            ticker = asyncio.create_task(report())
            await asyncio.gather(*(caller(client) for _ in range(share)))
            ticker.cancel()

    asyncio.run(run())
    record.flush()
    return record.samples()


def producer_count(spec: LoadSpec) -> int:
    """Producer processes a run starts: one request in flight each at the least."""
    return max(1, min(spec.producers, spec.concurrency))


def run_load(spec: LoadSpec, on_progress: Callable[[int, int, list[float]], None],
             on_tick: Callable[[float], None] | None = None,
             on_start: Callable[[float], None] | None = None) -> Samples:
    """Drive the pool with `spec`; call on_start(start) when every producer is ready and
    the clock starts, on_progress(done, errors, recent latencies) as reports arrive and
    on_tick(elapsed since the start) about every PROGRESS_S; return every sample, with
    `started` (monotonic): the clock of --duration and of on_tick."""
    mp = multiprocessing.get_context("spawn")
    progress: multiprocessing.Queue = mp.Queue()
    results: multiprocessing.Queue = mp.Queue()
    k = producer_count(spec)
    shares = [spec.concurrency // k + (1 if i < spec.concurrency % k else 0) for i in range(k)]
    quotas: list[int | None] = [None] * k
    if spec.requests is not None:
        quotas = [spec.requests // k + (1 if i < spec.requests % k else 0) for i in range(k)]
    start_line = StartLine.make(mp, k)
    procs = [mp.Process(target=_producer, args=(i, spec, shares[i], quotas[i], start_line,
                                                 progress, results), name=f"bench-producer-{i}")
             for i in range(k)]
    parts: dict[int, Samples] = {}
    try:
        with _sigint_ignored():
            for proc in procs:
                proc.start()
        start = start_line.start(spec.duration_s, procs)
        if on_start is not None:
            on_start(start)
        _collect(procs, progress, results, parts, start, on_progress, on_tick)
    finally:
        _stop(procs, abandoned=len(parts) < k)
    samples = Samples.concat([parts[i] for i in sorted(parts)])
    samples.started = start
    return samples


def _collect(procs: list[Any], progress: multiprocessing.Queue,
             results: multiprocessing.Queue, parts: dict[int, Samples], start: float,
             on_progress: Callable[[int, int, list[float]], None],
             on_tick: Callable[[float], None] | None) -> None:
    """Progress reports and ticks until every producer handed in its samples (into
    `parts`); RuntimeError if one dies first."""
    totals = {i: (0, 0) for i in range(len(procs))}
    while len(parts) < len(procs):
        try:
            index, done, errors, recent = progress.get(timeout=PROGRESS_S)
            totals[index] = (done, errors)
            on_progress(sum(d for d, _ in totals.values()),
                        sum(e for _, e in totals.values()), recent)
        except queue.Empty:
            pass
        if on_tick is not None:
            on_tick(time.monotonic() - start)
        while True:
            try:
                index, samples = results.get_nowait()
            except queue.Empty:
                break
            parts[index] = samples
        dead = [p for i, p in enumerate(procs) if i not in parts and p.exitcode not in
                (None, 0)]
        if dead:
            raise RuntimeError(f"producer {dead[0].name} died (exit {dead[0].exitcode})")


def _stop(procs: list[Any], abandoned: bool) -> None:
    """Reap the producers. Abandoned (Ctrl-C, a producer died): terminated at once, as they
    ignore SIGINT and would otherwise load the pool until their deadline."""
    for proc in procs:
        if abandoned and proc.is_alive():
            proc.terminate()
    for proc in procs:
        if proc.pid is None:
            continue  # never started (interrupted while the others were)
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while producers are started: they inherit it from their first
    instruction, so a Ctrl-C during their imports (before _producer runs) prints nothing
    there. Only the main thread may set a handler; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        # None: a handler set outside Python, which cannot be put back; the default then.
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None
                      else previous)


def latency_summary(latency: np.ndarray) -> dict[str, float | None]:
    """p50/p90/p99/p99.9/max in milliseconds over `latency` (those with one: answered)."""
    answered = latency[~np.isnan(latency)] * 1000
    if answered.size == 0:
        return {"p50": None, "p90": None, "p99": None, "p99.9": None, "max": None}
    q = np.percentile(answered, [50, 90, 99, 99.9])
    return {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
            "p99.9": float(q[3]), "max": float(answered.max())}


# -- the physical limit: libzmq's own proxy with echo workers ---------------------------------

ECHO_BODY = b'{"scores":[0.0],"version":"proxy"}'


def _proxy(frontend: str, backend: str) -> None:
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    front.bind(frontend)
    back.bind(backend)
    zmq.proxy(front, back)  # runs until the process is killed


def _proxy_echo_worker(backend: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(backend)
    while True:
        frames = sock.recv_multipart()
        # [client identity, ZP1, request_id, op, version, body] -> a protocol v1 reply
        sock.send_multipart([frames[0], frames[1], frames[2], STATUS_OK, ECHO_BODY])


class ProxyBaseline:
    """`zmq.proxy` (ROUTER -> DEALER) with `workers` echo processes, on ipc sockets."""

    def __init__(self, directory: str, workers: int) -> None:
        mp = multiprocessing.get_context("spawn")
        self.endpoint = f"ipc://{directory}/proxy-front.sock"
        backend = f"ipc://{directory}/proxy-back.sock"
        self.procs = [mp.Process(target=_proxy, args=(self.endpoint, backend), daemon=True)]
        self.procs += [mp.Process(target=_proxy_echo_worker, args=(backend,), daemon=True)
                       for _ in range(workers)]
        for proc in self.procs:
            proc.start()
        time.sleep(0.5)  # binds and connects settle; the load would only queue meanwhile

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.join(timeout=5)


# -- in a thread: the tests' load --------------------------------------------------------------

THREAD_DRAIN_S = 60.0  # after stop(), how long a ThreadLoad waits for outstanding replies
OPEN_LOOP_TICK_S = 0.005  # an open loop's pace between bursts of sends
MAX_BURST = 1000  # an open loop sends at most this many at once, catching up after a stall


@dataclass
class Reply:
    """One reply a ThreadLoad received."""

    request_id: bytes
    sent: float  # monotonic
    received: float  # wall clock (time.time), comparable with the pool's timestamps
    pinned: str
    status: bytes
    body: dict
    pairs: list[list[str]]

    @property
    def code(self) -> str:
        """OK_CODE, or the error's code."""
        return OK_CODE if self.status == STATUS_OK else self.body.get("code", INTERNAL)


class ThreadLoad:
    """A producer in a thread of this process, on one raw DEALER: what the tests run beside a
    pool while they rotate, kill and flood it, and then check every reply.

    Closed loop (`in_flight`): keeps that many similarity requests outstanding until stop(),
    sending at most `max_rate` per second when given (a paced load that still keeps requests
    in flight, without taking every core a closed loop would).
    Open loop (`rate`, requests per second): sends on schedule whatever comes back, without
    blocking (a full pipe is the flood's own backpressure), to push a pool past capacity.

    Request n asks for the pair (texts[n % len], texts[(n // len + offset) % len]). Every
    first reply is in `replies`; a second reply to the same request goes to `repeats` (the
    pool must never send one). stop() drains the outstanding replies for up to `drain_s`:
    what is still missing then counts as `lost`.
    """

    def __init__(self, endpoint: str, texts: list[str], *, in_flight: int = 64,
                 rate: float | None = None, max_rate: float | None = None,
                 pinned: str = "", offset: int = 3,
                 drain_s: float = THREAD_DRAIN_S, curve: ClientKeys | None = None) -> None:
        self.endpoint = endpoint
        self.texts = texts
        self.in_flight = in_flight
        self.rate = rate
        self.max_rate = max_rate
        self.pinned = pinned
        self.offset = offset
        self.drain_s = drain_s
        self.curve = curve
        self.replies: list[Reply] = []
        self.repeats: list[Reply] = []
        self.sent = 0
        self._outstanding: dict[bytes, tuple[float, list[list[str]]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ThreadLoad:
        self._thread = threading.Thread(target=self._run, daemon=True, name="thread-load")
        self._thread.start()
        return self

    def stop(self, timeout: float = 60) -> ThreadLoad:
        """Stop sending, wait (up to `timeout` s) for the drain to end."""
        self._stop.set()
        assert self._thread is not None, "stop() before start()"
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the load generator did not finish"
        return self

    # -- what happened ---------------------------------------------------------------------

    @property
    def lost(self) -> int:
        """Requests sent and never answered."""
        return self.sent - len(self.replies)

    def errors(self) -> list[dict]:
        return [r.body for r in self.replies if r.status != STATUS_OK]

    def versions(self) -> set[str]:
        return {r.body["version"] for r in self.replies if r.status == STATUS_OK}

    def versions_after(self, moment: float) -> set[str]:
        """Versions that served requests sent after `moment` (monotonic)."""
        return {r.body["version"] for r in self.replies
                if r.status == STATUS_OK and r.sent > moment}

    def codes(self) -> dict[str, int]:
        """How many replies, repeats included, carried each outcome."""
        out: dict[str, int] = {}
        for reply in [*self.replies, *self.repeats]:
            out[reply.code] = out.get(reply.code, 0) + 1
        return out

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        connect_dealer(sock, self.endpoint, self.curve)
        started = time.monotonic()
        drain_deadline: float | None = None
        try:
            while True:
                if not self._stop.is_set():
                    self._send_due(sock, started)
                elif not self._outstanding:
                    break
                else:
                    drain_deadline = drain_deadline or time.monotonic() + self.drain_s
                    if time.monotonic() > drain_deadline:
                        break  # whatever is still outstanding counts as lost
                self._receive(sock)
                if self._paced and not self._stop.is_set():
                    time.sleep(OPEN_LOOP_TICK_S)
        finally:
            sock.close()

    def _send_due(self, sock: zmq.Socket, started: float) -> None:
        if self.rate is None:
            allowed = (float("inf") if self.max_rate is None
                       else (time.monotonic() - started) * self.max_rate)
            while len(self._outstanding) < self.in_flight and self.sent < allowed:
                self._send(sock, 0)
            return
        due = int((time.monotonic() - started) * self.rate) - self.sent
        for _ in range(max(0, min(due, MAX_BURST))):
            try:
                self._send(sock, zmq.NOBLOCK)
            except zmq.Again:
                return  # the pipe is full: that is the flood's own backpressure

    @property
    def _paced(self) -> bool:
        return self.rate is not None or self.max_rate is not None

    def _send(self, sock: zmq.Socket, flags: int) -> None:
        n, size = self.sent, len(self.texts)
        pairs = [[self.texts[n % size], self.texts[(n // size + self.offset) % size]]]
        rid = n.to_bytes(8, "big")
        sock.send_multipart([PROTOCOL, rid, OP_SIMILARITY, self.pinned.encode(),
                             orjson.dumps({"pairs": pairs})], flags)
        self._outstanding[rid] = (time.monotonic(), pairs)
        self.sent += 1

    def _receive(self, sock: zmq.Socket) -> None:
        """Every reply waiting; a closed loop (or a drain) first waits up to 100 ms for one."""
        wait = 0 if self._paced and not self._stop.is_set() else 100
        while sock.poll(wait):
            _, rid, status, body = sock.recv_multipart()
            request = self._outstanding.pop(rid, None)
            sent, pairs = request or (float("nan"), [])
            reply = Reply(rid, sent, time.time(), self.pinned, status, orjson.loads(body), pairs)
            (self.replies if request is not None else self.repeats).append(reply)
            wait = 0


@dataclass(frozen=True, slots=True)
class Answer:
    """One call of FailoverProducers, answered or failed."""

    sent: float  # monotonic
    latency: float  # seconds
    version: str | None  # the version that answered; None: the call failed
    code: str  # OK_CODE, or the error's code


class FailoverProducers:
    """Producers as a fleet's users run them: one AsyncClient over every pool (least loaded,
    failover), `in_flight` calls at a time, paced to `rate` requests/s in all (None: as fast
    as answers come), in a thread of their own until stop(); every call's one answer kept."""

    def __init__(self, endpoints: list[str], texts: list[str], in_flight: int = 16,
                 rate: float | None = None) -> None:
        self.endpoints, self.texts = endpoints, texts
        self.in_flight, self.rate = in_flight, rate
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()),
                                        name="failover-producers")

    def start(self) -> FailoverProducers:
        self._thread.start()
        return self

    def stop(self, timeout: float = 60) -> FailoverProducers:
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the producers did not finish"
        return self

    async def _run(self) -> None:
        async with AsyncClient(self.endpoints, timeout=30) as client:
            await asyncio.gather(*(self._producer(client, k) for k in range(self.in_flight)))

    async def _producer(self, client: AsyncClient, k: int) -> None:
        n = len(self.texts)
        pace = self.in_flight / self.rate if self.rate else 0.0  # seconds per call, each
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                result = await client.similarity([(self.texts[k % n], self.texts[(k + 3) % n])])
                version, code = result.version, OK_CODE
            except ZeroPoolError as exc:
                version, code = None, exc.code
            latency = time.monotonic() - sent
            self.answers.append(Answer(sent, latency, version, code))
            await asyncio.sleep(max(0.0, pace - latency))

    def errors(self) -> list[Answer]:
        return [a for a in self.answers if a.code != OK_CODE]

    def versions(self, since: float = 0.0) -> set[str]:
        """Versions that answered calls sent at or after `since` (monotonic)."""
        return {a.version for a in self.answers if a.version and a.sent >= since}

    def slowest(self, since: float) -> float:
        """The longest call (seconds) among those sent at or after `since` (monotonic)."""
        return max((a.latency for a in self.answers if a.sent >= since), default=0.0)

    def window(self, start: float, end: float) -> dict[str, float]:
        """Calls sent in [start, end): how many, how many failed, p50 and p99 (ms)."""
        return self.where(lambda sent: start <= sent < end)

    def where(self, keep: Callable[[float], bool]) -> dict[str, float]:
        """`window` of the calls whose send time (monotonic) `keep` accepts."""
        sent = [a for a in self.answers if keep(a.sent)]
        latencies = sorted(a.latency for a in sent)
        out: dict[str, float] = {"requests": len(sent),
                                 "errors": sum(a.code != OK_CODE for a in sent)}
        if latencies:
            p50, p99 = np.percentile(latencies, [50, 99])
            out["p50_ms"], out["p99_ms"] = round(1000 * float(p50), 2), round(1000 * float(p99), 2)
        return out
