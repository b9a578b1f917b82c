"""The worker loop: one model version on one device, a DEALER to the router's backend.

Wait for requests, gather everything waiting (up to max_batch pairs or max_wait_ms), decode
and validate each body (router.bodies), run one deduplicated forward pass for the whole
batch, and send every reply of it in one message. A request that fails gets an error reply;
the worker lives on. A router message may carry more requests than one batch takes: the rest
wait in the backlog for the next.
The process around it is set up by pool.bootstrap.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson
import zmq

from pool import config
from pool.reports import BatchStats, ReadyInfo
from router import protocol
from router.bodies import BadBody, Limits, decode_body

log = logging.getLogger("zeropool.worker")


@dataclass(frozen=True)
class WorkerConfig:
    """What one worker process is told: who it is, and the pool's settings (typed, whole:
    a new setting reaches workers with its declaration in pool.config.PoolSettings)."""

    worker_id: str
    version: str
    path: str
    device: str  # "cpu" or "cuda:N" with N the physical GPU index
    settings: config.PoolSettings
    heartbeat_s: float = config.HEARTBEAT_S

    @property
    def capacity(self) -> int:
        return self.settings.capacity

    @property
    def max_batch(self) -> int:
        return self.settings.max_batch


@dataclass(slots=True)
class Job:
    seq: bytes
    op: bytes
    texts: list[str]  # embed: the texts; similarity: a, b, a, b, ...
    size: int  # pairs (similarity) or texts (embed): what counts against max_batch


def decode_job(seq: bytes, op: bytes, body: bytes, enqueued_ns: int, limits: Limits) -> Job:
    """One backend request as a Job; BadBody (with the protocol code) if its body is wrong."""
    asked = decode_body(op, body, enqueued_ns, limits)
    return Job(seq, op, asked.texts, asked.size)


def load_encoder(cfg: WorkerConfig, device: str) -> tuple[Any, float]:
    """Import, load and warm up the model at a lower CPU priority than the workers serving.

    Runs on a thread of its own: niceness is per thread on Linux, and only raising it needs
    no privilege, so the thread that serves afterwards keeps the normal priority. On a busy
    machine a new version then loads with the CPU the serving workers leave over, instead
    of taking half of it from them in the middle of a rotation.
    """
    if cfg.settings.load_niceness:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                           cfg.settings.load_niceness)
    import torch

    from pool.runtime import Encoder

    torch.set_num_threads(cfg.settings.threads)
    encoder = Encoder(cfg.path, device=device, dtype=cfg.settings.dtype,
                      graph=cfg.settings.graph)
    return encoder, encoder.warm_up()


def freeze_heap() -> None:
    """Take everything alive now (torch, transformers, the model) out of the collector's sight.

    Called once start-up is over, by workers and by the server. A full collection otherwise
    walks a worker's ~400k long-lived objects: 150-220 ms with the GIL held, a stall every
    request of the batch waits out (measured on a worker under load, docs/benchmarks.md).
    """
    gc.collect()
    gc.freeze()


class WorkerLoop:
    def __init__(self, cfg: WorkerConfig, sock: zmq.Socket, parent: int) -> None:
        self.cfg = cfg
        self.sock = sock
        self.parent = parent  # the server, or the forkserver that forked us
        self.stopping = False
        self.next_heartbeat = 0.0
        self.last_batch = 0  # requests in the previous batch: is there concurrent load?
        self.encoder: Any = None
        self.settings = cfg.settings
        self.limits = Limits(self.settings.max_pairs, self.settings.max_text_chars)
        self.stats = BatchStats()  # reported with every heartbeat
        self.backlog: deque[Job] = deque()  # decoded, not yet in a batch
        self.outbox: list[bytes] = []  # reply heads and bodies not yet sent

    def run(self) -> None:
        info = self._load()
        freeze_heap()
        self.sock.send_multipart([protocol.W_READY, info.encode()])
        log.info("ready: version %s on %s (%s, %s) in %.2fs", self.cfg.version, info.device,
                 info.dtype, info.graph, info.load_seconds)
        if info.graph_note:
            log.warning("forward passes run eager: the model could not be traced (%s)",
                        info.graph_note)
        self.next_heartbeat = time.monotonic() + self.cfg.heartbeat_s
        while not self.stopping or self.backlog:
            if self.backlog or self.sock.poll(int(self.cfg.heartbeat_s * 1000)):
                jobs = self._gather()
                if jobs:
                    self._serve(jobs)
                    self._flush()
            self._heartbeat_if_due()
            if os.getppid() != self.parent:
                log.warning("parent process is gone; exiting")
                return
        log.info("stopped")

    def _load(self) -> ReadyInfo:
        start = time.perf_counter()
        me = {"version": self.cfg.version, "worker_id": self.cfg.worker_id, "pid": os.getpid(),
              "capacity": self.cfg.capacity, "max_batch": self.cfg.max_batch,
              "device": self.cfg.device}
        if self.settings.model == "echo":
            return ReadyInfo(**me)
        device = "cuda:0" if self.cfg.device.startswith("cuda") else self.cfg.device
        with ThreadPoolExecutor(1, thread_name_prefix="zeropool-load") as loader:
            self.encoder, warm_up_seconds = loader.submit(load_encoder, self.cfg,
                                                          device).result()
        import torch  # imported by the loader already

        torch.set_num_threads(self.settings.threads)  # this thread runs the forward passes
        return ReadyInfo(
            **me, load_seconds=round(time.perf_counter() - start, 3),
            warm_up_seconds=round(warm_up_seconds, 3),
            dtype=str(self.encoder.dtype).removeprefix("torch."),
            graph=self.encoder.graph, graph_note=self.encoder.graph_note,
            dim=self.encoder.dim,
            max_length=self.encoder.max_length,
            gpu_memory_bytes=(torch.cuda.memory_reserved() if device.startswith("cuda") else 0),
        )

    def _heartbeat_if_due(self) -> None:
        now = time.monotonic()
        if now >= self.next_heartbeat:
            self.sock.send_multipart([protocol.W_HEARTBEAT, self.stats.encode()])
            self.next_heartbeat = now + self.cfg.heartbeat_s

    # -- batching ----------------------------------------------------------------------

    def _gather(self) -> list[Job]:
        """The backlog and everything waiting now, then more for up to max_wait_ms while
        under max_batch. Requests that need no model (bad bodies) are answered at once.

        The wait only pays off under concurrent load: after a batch of one request, the next
        request is served at once instead of idling max_wait_ms for company.
        """
        jobs: list[Job] = []
        size = 0
        wait_s = self.settings.max_wait_ms / 1000 if self.last_batch > 1 else 0.0
        deadline = time.monotonic() + wait_s
        backlog = self.backlog
        while True:
            while backlog and size < self.cfg.max_batch:
                job = backlog.popleft()
                jobs.append(job)
                size += job.size
            if size >= self.cfg.max_batch or self.stopping:
                break
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.sock.poll(max(1, int(remaining * 1000))):
                    break
                continue
            self._accept(frames)
        self._flush()
        self.last_batch = len(jobs)
        return jobs

    def _accept(self, frames: list[bytes]) -> None:
        """Decode one backend message into the backlog; bad bodies get their error reply."""
        if frames[0] == protocol.W_STOP:
            self.stopping = True
            return
        if frames[0] != protocol.W_REQUEST:
            return
        for i in range(1, len(frames) - 1, 2):
            seq, enqueued_ns, op = protocol.split_request_head(frames[i])
            try:
                self.backlog.append(decode_job(seq, op, frames[i + 1], enqueued_ns,
                                               self.limits))
            except BadBody as exc:
                self._reply_error(seq, exc.code, str(exc))

    def _serve(self, jobs: list[Job]) -> None:
        if self.settings.model == "echo":
            for job in jobs:
                self._reply(seq=job.seq, body={"scores": [0.0] * (len(job.texts) // 2),
                                               "version": self.cfg.version})
            return
        unique = list(dict.fromkeys(t for job in jobs for t in job.texts))
        self._count_batch(jobs, unique)
        try:
            vectors = self.encoder.embed(unique).numpy()
        except Exception as exc:  # OOM, a model that cannot take some input: the worker lives
            _release_cuda_cache()
            self.stats.failed_batches += 1
            if len(jobs) > 1:
                # One request's failure must not fail the others batched with it.
                log.warning("forward pass of %d requests failed (%s: %s); running each alone",
                            len(jobs), type(exc).__name__, exc)
                for job in jobs:
                    self._serve([job])
                return
            log.exception("forward pass failed for request %s", jobs[0].seq.hex())
            self._reply_error(jobs[0].seq, protocol.INTERNAL, f"{type(exc).__name__}: {exc}"[:500])
            return
        index = {t: i for i, t in enumerate(unique)}
        for job in jobs:
            rows = vectors[[index[t] for t in job.texts]]
            if job.op == protocol.OP_EMBED:
                self._reply(job.seq, {"embeddings": rows, "dim": int(rows.shape[1]),
                                      "version": self.cfg.version})
            else:
                scores = (rows[0::2] * rows[1::2]).sum(axis=1)
                self._reply(job.seq, {"scores": scores.tolist(), "version": self.cfg.version})

    def _count_batch(self, jobs: list[Job], unique: list[str]) -> None:
        self.stats.count_batch(requests=len(jobs), texts=sum(len(job.texts) for job in jobs),
                               unique_texts=len(unique), items=sum(job.size for job in jobs))

    def _reply(self, seq: bytes, body: dict) -> None:
        raw = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        self.outbox += (protocol.reply_head(seq, protocol.STATUS_OK), raw)

    def _reply_error(self, seq: bytes, code: str, message: str) -> None:
        self.outbox += (protocol.reply_head(seq, protocol.STATUS_ERROR),
                        protocol.error_body(code, message))

    def _flush(self) -> None:
        """Send every reply waiting, in one message."""
        if self.outbox:
            self.sock.send_multipart([protocol.W_REPLY, *self.outbox])
            self.outbox = []


def _release_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort after a failure; never mask the original error
        pass
