"""The worker process: one model version on one device, a DEALER to the router's backend.

Loop: wait for requests, gather everything waiting (up to max_batch pairs or max_wait_ms),
decode and validate each body, run one deduplicated forward pass for the whole batch, reply
per request. A request that fails gets an error reply; the worker lives on.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson
import zmq

from pool import config as c
from pool.logs import JsonLogFormatter
from router import protocol as p

log = logging.getLogger("zeropool.worker")

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    version: str
    path: str
    device: str  # "cpu" or "cuda:N" with N the physical GPU index
    dtype: str
    threads: int
    max_batch: int
    max_wait_ms: float
    capacity: int
    backend: str
    heartbeat_s: float
    model: str = "transformer"  # "echo": no model, for measuring the transport alone
    max_pairs: int = c.DEFAULT_MAX_PAIRS
    max_text_chars: int = c.DEFAULT_MAX_TEXT_CHARS
    log_json: bool = False
    load_niceness: int = c.DEFAULT_LOAD_NICENESS


@dataclass(slots=True)
class Job:
    seq: bytes
    op: bytes
    texts: list[str]  # embed: the texts; similarity: a, b, a, b, ...
    size: int  # pairs (similarity) or texts (embed): what counts against max_batch


class BadBody(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def worker_main(cfg: WorkerConfig) -> None:
    """Process entry point (multiprocessing `spawn` or `forkserver`, pool.startmethod)."""
    parent = os.getppid()
    _pin_device(cfg)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    _release_forkserver_pipe()
    _die_with_parent()
    if os.getppid() != parent:
        os._exit(0)  # it died before PDEATHSIG was armed
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if cfg.log_json else logging.Formatter(
        f"%(asctime)s worker {cfg.worker_id} %(levelname)s %(message)s"))
    handler.addFilter(lambda record: setattr(record, "worker", cfg.worker_id) or True)
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, cfg.worker_id.encode())
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(cfg.backend)
    try:
        WorkerLoop(cfg, sock, parent).run()
    finally:
        sock.close()
        ctx.term()  # delivers the last replies (LINGER bounds it)
    # Nothing left to flush: skip the interpreter's (torch's) slow teardown.
    logging.shutdown()
    os._exit(0)


def load_encoder(cfg: WorkerConfig, device: str) -> tuple[Any, float]:
    """Import, load and warm up the model at a lower CPU priority than the workers serving.

    Runs on a thread of its own: niceness is per thread on Linux, and only raising it needs
    no privilege, so the thread that serves afterwards keeps the normal priority. On a busy
    machine a new version then loads with the CPU the serving workers leave over, instead
    of taking half of it from them in the middle of a rotation.
    """
    if cfg.load_niceness:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), cfg.load_niceness)
    import torch

    from pool.runtime import Encoder

    torch.set_num_threads(cfg.threads)
    encoder = Encoder(cfg.path, device=device, dtype=cfg.dtype)
    return encoder, encoder.warm_up()


def freeze_heap() -> None:
    """Take everything alive now (torch, transformers, the model) out of the collector's sight.

    Called once start-up is over, by workers and by the server. A full collection otherwise
    walks a worker's ~400k long-lived objects: 150-220 ms with the GIL held, a stall every
    request of the batch waits out (measured on a worker under load, docs/benchmarks.md).
    """
    gc.collect()
    gc.freeze()


def _pin_device(cfg: WorkerConfig) -> None:
    # Must happen before torch initialises CUDA (a forkserver imports torch, never CUDA).
    if cfg.device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = cfg.device.split(":", 1)[1]
    for key, value in worker_env(cfg.threads).items():
        os.environ.setdefault(key, value)


def worker_env(threads: int) -> dict[str, str]:
    """Environment a worker needs before torch or tokenizers initialise (defaults only)."""
    return {
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        # torch.cuda.is_available() through NVML, not cuInit: a forked child can use CUDA.
        "PYTORCH_NVML_BASED_CUDA_CHECK": "1",
    }


def _release_forkserver_pipe() -> None:
    """A forked worker inherits the pool's end of the forkserver's "alive" pipe. Held here,
    it would keep the forkserver, and so this worker, alive after the pool is killed."""
    from multiprocessing import forkserver

    server = forkserver._forkserver  # type: ignore[attr-defined]
    if server._forkserver_alive_fd is not None:
        with contextlib.suppress(OSError):
            os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM us if our parent dies (the server, or the forkserver that forked
    us, which exits with the server); the loop also watches getppid()."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class WorkerLoop:
    def __init__(self, cfg: WorkerConfig, sock: zmq.Socket, parent: int) -> None:
        self.cfg = cfg
        self.sock = sock
        self.parent = parent  # the server, or the forkserver that forked us
        self.stopping = False
        self.next_heartbeat = 0.0
        self.last_batch = 0  # requests in the previous batch: is there concurrent load?
        self.encoder: Any = None
        self.limits = Limits(cfg.max_pairs, cfg.max_text_chars)
        # Reported with every heartbeat: how well batching and dedupe work.
        self.stats: dict[str, Any] = {
            "batches": 0, "requests": 0, "texts": 0, "unique_texts": 0, "failed_batches": 0,
            "batch_items": 0,  # pairs or texts, summed over batches
            # per bucket of c.BATCH_SIZE_BUCKETS, plus one for larger batches
            "batch_size_counts": [0] * (len(c.BATCH_SIZE_BUCKETS) + 1),
        }

    def run(self) -> None:
        info = self._load()
        freeze_heap()
        self.sock.send_multipart([p.W_READY, orjson.dumps(info)])
        log.info("ready: version %s on %s in %.2fs", self.cfg.version, info["device"],
                 info["load_seconds"])
        self.next_heartbeat = time.monotonic() + self.cfg.heartbeat_s
        while not self.stopping:
            if self.sock.poll(int(self.cfg.heartbeat_s * 1000)):
                jobs = self._gather()
                if jobs:
                    self._serve(jobs)
            self._heartbeat_if_due()
            if os.getppid() != self.parent:
                log.warning("parent process is gone; exiting")
                return
        log.info("stopped")

    def _load(self) -> dict:
        start = time.perf_counter()
        info: dict[str, Any] = {
            "version": self.cfg.version,
            "worker_id": self.cfg.worker_id,
            "pid": os.getpid(),
            "capacity": self.cfg.capacity,
            "max_batch": self.cfg.max_batch,
            "device": self.cfg.device,
        }
        if self.cfg.model == "echo":
            info.update(load_seconds=0.0, dtype="none", dim=0)
            return info
        device = "cuda:0" if self.cfg.device.startswith("cuda") else self.cfg.device
        with ThreadPoolExecutor(1, thread_name_prefix="zeropool-load") as loader:
            self.encoder, warm_up_seconds = loader.submit(load_encoder, self.cfg,
                                                          device).result()
        import torch  # imported by the loader already

        torch.set_num_threads(self.cfg.threads)  # this thread runs the forward passes
        info.update(
            load_seconds=round(time.perf_counter() - start, 3),
            warm_up_seconds=round(warm_up_seconds, 3),
            dtype=str(self.encoder.dtype).removeprefix("torch."),
            dim=self.encoder.dim,
            max_length=self.encoder.max_length,
            gpu_memory_bytes=(torch.cuda.memory_reserved() if device.startswith("cuda") else 0),
        )
        return info

    def _heartbeat_if_due(self) -> None:
        now = time.monotonic()
        if now >= self.next_heartbeat:
            self.sock.send_multipart([p.W_HEARTBEAT, orjson.dumps(self.stats)])
            self.next_heartbeat = now + self.cfg.heartbeat_s

    # -- batching ----------------------------------------------------------------------

    def _gather(self) -> list[Job]:
        """Everything waiting now, then more for up to max_wait_ms while under max_batch.

        The wait only pays off under concurrent load: after a batch of one request, the next
        request is served at once instead of idling max_wait_ms for company.
        """
        jobs: list[Job] = []
        size = 0
        wait_s = self.cfg.max_wait_ms / 1000 if self.last_batch > 1 else 0.0
        deadline = time.monotonic() + wait_s
        while size < self.cfg.max_batch:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.sock.poll(max(1, int(remaining * 1000))):
                    break
                continue
            job = self._accept(frames)
            if job is not None:
                jobs.append(job)
                size += job.size
        self.last_batch = len(jobs)
        return jobs

    def _accept(self, frames: list[bytes]) -> Job | None:
        """Decode one backend message; answer at once what needs no model."""
        if frames[0] == p.W_STOP:
            self.stopping = True
            return None
        if frames[0] != p.W_REQUEST:
            return None
        _, seq, op, body, enqueued_ns = frames
        try:
            job = decode_job(seq, op, body, int.from_bytes(enqueued_ns, "little"), self.limits)
        except BadBody as exc:
            self._reply_error(seq, exc.code, str(exc))
            return None
        return job

    def _serve(self, jobs: list[Job]) -> None:
        if self.cfg.model == "echo":
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
            self.stats["failed_batches"] += 1
            if len(jobs) > 1:
                # One request's failure must not fail the others batched with it.
                log.warning("forward pass of %d requests failed (%s: %s); running each alone",
                            len(jobs), type(exc).__name__, exc)
                for job in jobs:
                    self._serve([job])
                return
            log.exception("forward pass failed for request %s", jobs[0].seq.hex())
            self._reply_error(jobs[0].seq, p.INTERNAL, f"{type(exc).__name__}: {exc}"[:500])
            return
        index = {t: i for i, t in enumerate(unique)}
        for job in jobs:
            rows = vectors[[index[t] for t in job.texts]]
            if job.op == p.OP_EMBED:
                self._reply(job.seq, {"embeddings": rows, "dim": int(rows.shape[1]),
                                      "version": self.cfg.version})
            else:
                scores = (rows[0::2] * rows[1::2]).sum(axis=1)
                self._reply(job.seq, {"scores": scores.tolist(), "version": self.cfg.version})

    def _count_batch(self, jobs: list[Job], unique: list[str]) -> None:
        self.stats["batches"] += 1
        self.stats["requests"] += len(jobs)
        self.stats["texts"] += sum(len(job.texts) for job in jobs)
        self.stats["unique_texts"] += len(unique)
        items = sum(job.size for job in jobs)
        self.stats["batch_items"] += items
        self.stats["batch_size_counts"][bisect.bisect_left(c.BATCH_SIZE_BUCKETS, items)] += 1

    def _reply(self, seq: bytes, body: dict) -> None:
        raw = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        self.sock.send_multipart([p.W_REPLY, seq, p.STATUS_OK, raw])

    def _reply_error(self, seq: bytes, code: str, message: str) -> None:
        self.sock.send_multipart([p.W_REPLY, seq, p.STATUS_ERROR, p.error_body(code, message)])


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits of one request (`pool serve --max-pairs`, `--max-text-chars`)."""

    max_pairs: int = c.DEFAULT_MAX_PAIRS  # pairs per similarity request, texts per embed
    max_text_chars: int = c.DEFAULT_MAX_TEXT_CHARS  # characters (code points) per text


def decode_job(seq: bytes, op: bytes, body: bytes, enqueued_ns: int, limits: Limits) -> Job:
    """Validate a request body; raise BadBody with the protocol code on anything wrong.

    Over a limit is `too_large`, naming the item, its size, the limit and the flag that
    raises it; nothing is ever cut to fit.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadBody(p.BAD_REQUEST, f"body is not UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadBody(p.BAD_REQUEST, "body must be a JSON object")
    timeout_ms = doc.get("timeout_ms")
    problem = p.timeout_ms_problem(timeout_ms)
    if problem is not None:
        raise BadBody(p.BAD_REQUEST, problem)
    if timeout_ms is not None:
        waited_ms = (time.monotonic_ns() - enqueued_ns) / 1e6
        if waited_ms > timeout_ms:
            raise BadBody(p.TIMEOUT, f"waited {waited_ms:.0f} ms, over timeout_ms={timeout_ms}")
    if op == p.OP_SIMILARITY:
        pairs = doc.get("pairs")
        if not isinstance(pairs, list) or not pairs:
            raise BadBody(p.BAD_REQUEST, '"pairs" must be a non-empty list of [text, text]')
        _check_count(len(pairs), "pairs", limits)
        texts: list[str] = []
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, list) and len(pair) == 2
                    and isinstance(pair[0], str) and isinstance(pair[1], str)):
                raise BadBody(p.BAD_REQUEST, f"pairs[{i}] must be a list of two strings")
            _check_chars(pair[0], f"pairs[{i}][0]", limits)
            _check_chars(pair[1], f"pairs[{i}][1]", limits)
            texts += pair
        return Job(seq, op, texts, len(pairs))
    if op == p.OP_EMBED:
        texts = doc.get("texts")
        if not isinstance(texts, list) or not texts:
            raise BadBody(p.BAD_REQUEST, '"texts" must be a non-empty list of strings')
        _check_count(len(texts), "texts", limits)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise BadBody(p.BAD_REQUEST, f"texts[{i}] must be a string")
            _check_chars(text, f"texts[{i}]", limits)
        return Job(seq, op, texts, len(texts))
    raise BadBody(p.BAD_REQUEST, f"op {op[:32]!r} is not served by workers")


def _check_count(count: int, what: str, limits: Limits) -> None:
    if count > limits.max_pairs:
        raise BadBody(p.TOO_LARGE, f"{count} {what} in one request, over the limit of "
                                   f"{limits.max_pairs}: split the request, or raise the limit "
                                   "with `pool serve --max-pairs`")


def _check_chars(text: str, where: str, limits: Limits) -> None:
    if len(text) > limits.max_text_chars:
        raise BadBody(p.TOO_LARGE, f"{where} has {len(text)} characters, over the limit of "
                                   f"{limits.max_text_chars}: shorten it, or raise the limit "
                                   "with `pool serve --max-text-chars`")


def _release_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort after a failure; never mask the original error
        pass
