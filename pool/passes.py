"""A worker's device thread: batches out of the job queue, one forward pass each, replies.

The worker's main thread (pool.worker.WorkerLoop) owns the backend socket: it receives,
decodes, validates and tokenises requests, and queues them here as Jobs. This thread takes
whatever is queued (up to max_batch pairs, waiting up to max_wait_ms to fill a batch), runs
one deduplicated forward pass, and sends the batch's replies, one message, over an inproc
PAIR socket of its own that the main thread forwards to the router. So the next batch is
received and tokenised while the device computes this one: the Rust tokenizer and torch
both run without the GIL, on the cores the device thread leaves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import zmq

from pool.quality import SEED_THRESHOLDS, Thresholds
from pool.reports import BatchStats
from router import protocol

log = logging.getLogger("zeropool.worker")

# Frames on the PAIR socket from the device thread besides reply messages: it has stopped,
# after answering every job queued before the stop; or it has died of a bug.
PASSES_DONE = b"\x00passes-done"
PASSES_CRASHED = b"\x00passes-crashed"
QUEUE_POLL_S = 1.0  # how often a wait on the queue looks up from it (bounds every wait)
# Passes that keep a pipeline. Producers that send their next request when one is answered
# keep L requests in flight; a pass of all L leaves the device idle while its replies travel
# and the next requests are decoded and tokenised. A pass of at most half of what the worker
# held lately lets the other half be prepared meanwhile (a 2-layer BERT at 64 in flight:
# 10.7k -> 11.6k pairs/s; at 256, and MiniLM, no change: docs/benchmarks.md, session 13).
PIPELINE_WINDOW_PASSES = 8  # "lately": a tokenising lag at one pass must not halve the next
PIPELINE_MIN_SIZE = 16  # held work below this is one pass: no split at light load
# Half passes only where preparing a text costs at least this share of computing it: there is
# something to hide. A model whose passes dwarf their tokenising loses by halving (smaller
# passes compute less efficiently): MiniLM bf16, 1 worker, 32 in flight, 378-389 pairs/s
# halved against 394-415 whole, where tokenising is ~1% of a pass; a 2-layer BERT's is ~35%.
PIPELINE_MIN_PREP_SHARE = 0.1
COST_SMOOTHING = 0.2  # weight of the newest measure in a per-text cost (exponential average)


@dataclass(slots=True)
class Job:
    seq: bytes
    op: bytes
    texts: list[str]  # embed: the texts; similarity: a, b, a, b, ...
    size: int  # pairs (similarity) or texts (embed): what counts against max_batch
    ids: list[list[int]] | None = None  # token ids per text, filled at intake (echo: none)
    tokens: int = 0  # the ids' lengths summed: what counts against max_batch_tokens
    truncate: bool = True  # false: a text over the model's input limit is refused, not cut
    received_ns: int = 0  # monotonic, at intake
    transit_ns: int = 0  # from the router taking it to intake (one machine, one clock)


class JobQueue:
    """Jobs decoded and tokenised by the main thread, waiting for the device thread."""

    def __init__(self) -> None:
        self._jobs: deque[Job] = deque()
        self._size = 0  # the jobs' sizes summed (kept: read before every pass)
        self._ready = threading.Condition()
        self.closed = False  # no more jobs: the device thread stops once this is empty

    def put(self, jobs: list[Job]) -> None:
        added = sum(job.size for job in jobs)
        with self._ready:
            self._jobs.extend(jobs)
            self._size += added
            self._ready.notify()

    def close(self) -> None:
        with self._ready:
            self.closed = True
            self._ready.notify()

    def __len__(self) -> int:
        return len(self._jobs)

    def queued_size(self) -> int:
        """Pairs (or embed texts) waiting: what counts against max_batch."""
        with self._ready:
            return self._size

    def take(self, max_size: int, wait_s: float, max_tokens: int = 0) -> list[Job] | None:
        """Jobs up to max_size (pairs or texts; the last job may go over) and, if max_tokens,
        short of max_tokens (a job over it alone is taken alone); waiting for the first job,
        then up to wait_s for more. None once closed and empty."""
        taken: list[Job] = []
        size = tokens = 0
        deadline = None
        jobs = self._jobs
        with self._ready:
            while True:
                while jobs and size < max_size and not (
                        max_tokens and taken and tokens + jobs[0].tokens > max_tokens):
                    job = jobs.popleft()
                    taken.append(job)
                    size += job.size
                    tokens += job.tokens
                    self._size -= job.size
                full = size >= max_size or bool(max_tokens and jobs and taken)
                if full or (taken and self.closed):
                    return taken
                if not taken:
                    if self.closed:
                        return None
                    self._ready.wait(QUEUE_POLL_S)
                    continue
                if deadline is None:
                    deadline = time.monotonic() + wait_s
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return taken
                self._ready.wait(remaining)


def worth_pipelining(prep_s_per_text: float | None, pass_s_per_text: float | None) -> bool:
    """Whether half passes hide enough preparation to pay for their smaller passes (unknown
    costs: not yet)."""
    if prep_s_per_text is None or not pass_s_per_text:
        return False
    return prep_s_per_text >= PIPELINE_MIN_PREP_SHARE * pass_s_per_text


def smoothed(average: float | None, sample: float) -> float:
    return sample if average is None else average + COST_SMOOTHING * (sample - average)


def pipelined_limit(max_batch: int, recent_held: Iterable[int]) -> int:
    """The size limit of the next pass: half of the most work the worker held over the
    last passes (queued, plus the pass before whose replies are out), within max_batch; all
    of it when that is under PIPELINE_MIN_SIZE. A deep queue still makes full passes."""
    peak = max(recent_held, default=0)
    if peak < PIPELINE_MIN_SIZE:
        return max_batch
    return min(max_batch, -(-peak // 2))


def echo_answer(job: Job, version: str) -> dict[str, Any]:
    """The echo model's reply: the shape of the real one (zero scores, empty embeddings)."""
    if job.op == protocol.OP_EMBED:
        return {"embeddings": [[] for _ in job.texts], "dim": 0, "version": version,
                "tokens": [0] * len(job.texts)}
    return {"scores": [0.0] * (len(job.texts) // 2), "version": version}


class DeviceThread:
    """Runs the forward passes: `embed` (token ids of distinct texts -> their normalised
    vectors, a numpy array, one row per text) or, on the echo model, none."""

    def __init__(self, queue: JobQueue, version: str, max_batch: int, max_wait_ms: float,
                 embed: Callable[[list[list[int]]], Any] | None, stats: BatchStats,
                 on_failure: Callable[[], None] = lambda: None, max_batch_tokens: int = 0,
                 thresholds: Thresholds = SEED_THRESHOLDS, pipelined: bool = True) -> None:
        self.queue = queue
        self.version = version
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.pipelined = pipelined  # --passes: pipelined_limit, or max_batch every time
        self.max_wait_s = max_wait_ms / 1000
        self.embed = embed
        # The optional "thresholds" key of every similarity reply (docs/protocol.md).
        self.thresholds = [thresholds.high, thresholds.low]
        self.stats = stats  # the main thread reads it for heartbeats
        self.on_failure = on_failure  # after a failed pass (frees device memory)
        self.pass_started = 0.0  # monotonic start of the pass running now; 0 between passes
        self.progressed_at = 0.0  # monotonic: the pass's start, then each part's end
        self.last_batch = 0  # requests in the previous batch: is there concurrent load?
        self.last_size = 0  # its pairs: out for a round trip while the next pass is chosen
        self.recent_held: deque[int] = deque(maxlen=PIPELINE_WINDOW_PASSES)
        # Seconds per text, smoothed: decoding and tokenising (the main thread notes it) and
        # computing. Whether half passes pay (worth_pipelining).
        self.prep_s_per_text: float | None = None
        self.pass_s_per_text: float | None = None
        self.outbox: list[bytes] = []

    def run(self, pair: zmq.Socket) -> None:
        """Until the queue is closed and empty. `pair`: this thread's own end of the PAIR
        to the main thread, made in this thread."""
        try:
            idle_since = time.monotonic_ns()
            while (jobs := self._next_batch()) is not None:
                started = time.monotonic_ns()
                self.pass_started = self.progressed_at = started / 1e9
                self._serve(jobs)
                done = time.monotonic_ns()
                self.pass_started = 0.0
                # Counted before the replies go, so that a heartbeat sent after them has it.
                self._count_times(jobs, idle_since, started, done)
                self._note_pass((done - started) / 1e9, jobs)
                pair.send_multipart([protocol.W_REPLY, b"".join(self.outbox)])
                self.outbox = []
                idle_since = done
        except Exception:  # a bug: the worker must exit, so that its requests are re-run
            log.exception("the device thread failed")
            pair.send(PASSES_CRASHED)
        else:
            pair.send(PASSES_DONE)

    def serve_queued(self) -> list[list[bytes]]:
        """Everything queued now, served on the calling thread instead (the echo model):
        one reply message per pass. Only for a queue no other thread takes from."""
        messages = []
        while len(self.queue):
            jobs = self.queue.take(self.max_batch, 0.0, self.max_batch_tokens)
            if jobs is None:
                break
            self._serve(jobs)
            messages.append([protocol.W_REPLY, b"".join(self.outbox)])
            self.outbox = []
        return messages

    def _next_batch(self) -> list[Job] | None:
        # The wait only pays off under concurrent load: after a batch of one request, the
        # next request is served at once instead of idling max_wait_ms for company.
        wait_s = self.max_wait_s if self.last_batch > 1 else 0.0
        jobs = self.queue.take(self._pass_limit(), wait_s, self.max_batch_tokens)
        self.last_batch = len(jobs) if jobs else 0
        self.last_size = sum(job.size for job in jobs) if jobs else 0
        return jobs

    def _pass_limit(self) -> int:
        if not self.pipelined:
            return self.max_batch
        self.recent_held.append(self.queue.queued_size() + self.last_size)
        if not worth_pipelining(self.prep_s_per_text, self.pass_s_per_text):
            return self.max_batch
        return pipelined_limit(self.max_batch, self.recent_held)

    def note_progress(self) -> None:
        """A part of the running pass has finished (a long pass is many: the main thread
        keeps heartbeating while they finish)."""
        self.progressed_at = time.monotonic()

    def note_preparation(self, seconds: float, texts: int) -> None:
        """The main thread decoded and tokenised `texts` texts in `seconds`."""
        if texts:
            self.prep_s_per_text = smoothed(self.prep_s_per_text, seconds / texts)

    def _note_pass(self, seconds: float, jobs: list[Job]) -> None:
        texts = sum(len(job.texts) for job in jobs)
        if texts:
            self.pass_s_per_text = smoothed(self.pass_s_per_text, seconds / texts)

    def _serve(self, jobs: list[Job]) -> None:
        if self.embed is None:  # the echo model: transport only, its answers judge nothing
            for job in jobs:
                self._reply(job.seq, echo_answer(job, self.version))
            return
        first_ids: dict[str, list[int]] = {}
        for job in jobs:
            for text, ids in zip(job.texts, job.ids or (), strict=True):
                first_ids.setdefault(text, ids)
        unique = list(first_ids)
        try:
            vectors = self.embed(list(first_ids.values()))
        except Exception as exc:  # OOM, a model that cannot take some input: the worker lives
            self.on_failure()
            self.stats.failed_batches += 1
            if len(jobs) > 1:
                # One request's failure must not fail the others batched with it.
                log.warning("forward pass of %d requests failed (%s: %s); running each alone",
                            len(jobs), type(exc).__name__, exc)
                for job in jobs:
                    self._serve([job])
                return
            log.exception("forward pass failed for request %s", jobs[0].seq.hex())
            self.reply_error(jobs[0].seq, protocol.INTERNAL, f"{type(exc).__name__}: {exc}"[:500])
            return
        # Counted once it has computed: a failed pass's requests are counted by the passes
        # that rerun them, one by one (failed_batches counts the failures).
        self._count_batch(jobs, len(unique))
        index = {t: i for i, t in enumerate(unique)}
        pairs = [job for job in jobs if job.op != protocol.OP_EMBED]
        if pairs:  # every similarity request's scores in one vector operation
            rows = vectors[[index[t] for job in pairs for t in job.texts]]
            scores = (rows[0::2] * rows[1::2]).sum(axis=1).tolist()
            at = 0
            for job in pairs:
                self._reply(job.seq, {"scores": scores[at:at + job.size],
                                      "version": self.version,
                                      "thresholds": self.thresholds})
                at += job.size
        for job in jobs:
            if job.op == protocol.OP_EMBED:
                rows = vectors[[index[t] for t in job.texts]]
                # "tokens": the optional key of docs/protocol.md, special tokens included,
                # so that an HTTP door can report real usage.
                self._reply(job.seq, {"embeddings": rows, "dim": int(rows.shape[1]),
                                      "version": self.version,
                                      "tokens": [len(ids) for ids in job.ids or ()]})

    def _count_times(self, jobs: list[Job], idle_since: int, started: int, done: int) -> None:
        self.stats.count_times(
            busy_s=(done - started) / 1e9, idle_s=(started - idle_since) / 1e9,
            transit_s=sum(job.transit_ns for job in jobs) / 1e9,
            queued_s=sum(started - job.received_ns for job in jobs) / 1e9,
            pass_s=(done - started) * len(jobs) / 1e9)

    def busy_seconds(self, now: float) -> float:
        """Seconds computing so far, the pass running now included."""
        started = self.pass_started
        return self.stats.device_busy_s + (now - started if started else 0.0)

    def _count_batch(self, jobs: list[Job], unique_texts: int) -> None:
        self.stats.count_batch(requests=len(jobs), texts=sum(len(job.texts) for job in jobs),
                               unique_texts=unique_texts, items=sum(job.size for job in jobs))

    def _reply(self, seq: bytes, body: dict) -> None:
        raw = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        self.outbox.append(protocol.reply_entry(seq, protocol.STATUS_OK, raw))

    def reply_error(self, seq: bytes, code: str, message: str) -> None:
        self.outbox.append(protocol.error_entry(seq, code, message))
