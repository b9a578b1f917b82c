"""The worker loop: one model version on one device, a DEALER to the router's backend.

Two threads. This module's main thread owns the socket: it receives request messages,
decodes and validates each body (router.bodies), tokenises the texts and queues the jobs;
it forwards replies, heartbeats, and obeys STOP. The device thread (pool.passes) takes
everything queued (up to max_batch pairs, or max_wait_ms) as one deduplicated forward pass
and sends every reply of it in one message. So receiving and tokenising the next batch
overlaps the device computing this one. A request that fails gets an error reply; the
worker lives on. The process around it is set up by pool.bootstrap.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import zmq

from pool import config
from pool.cpus import core_list_text, pin_this_thread
from pool.modeldir import NO_PROMPTS, Prompts
from pool.passes import PASSES_CRASHED, PASSES_DONE, DeviceThread, Job, JobQueue
from pool.quality import SEED_THRESHOLDS, Thresholds
from pool.reports import BatchStats, ReadyInfo
from router import protocol
from router.bodies import BadBody, Limits, decode_body, item_error, text_place

log = logging.getLogger("zeropool.worker")

INTAKE_MESSAGES = 256  # backend messages taken per turn before replies get forwarded again
# Texts tokenised and queued at a time: the device thread starts on the first part of a large
# intake while this thread tokenises the rest (a GPU worker at 256 in flight took ~200
# requests per turn, and their pass waited for all of them: docs/benchmarks.md, session 11).
TOKENIZE_CHUNK_TEXTS = 256
DEVICE_JOIN_S = 5.0  # how long an exiting worker waits for a pass still running


@dataclass(frozen=True)
class WorkerConfig:
    """What one worker process is told: who it is, and the pool's settings (typed, whole:
    a new setting reaches workers with its declaration in pool.config.PoolSettings)."""

    worker_id: str
    version: str
    path: str
    device: str  # "cpu" or "cuda:N" with N the physical GPU index
    settings: config.PoolSettings
    # Its version's verdict thresholds, resolved once by the serve process (VersionPlan):
    # every similarity reply carries them, so whoever reads a score can judge it.
    thresholds: Thresholds = SEED_THRESHOLDS
    heartbeat_s: float = config.HEARTBEAT_S
    # The serve process: the worker's parent (spawn) or its parent's (the forkserver's).
    server_pid: int = field(default_factory=os.getpid)
    slot: int = 0  # its place among its version's workers: which cores its passes run on

    @property
    def capacity(self) -> int:
        return self.settings.capacity

    @property
    def max_batch(self) -> int:
        return self.settings.max_batch


def decode_job(seq: bytes, op: bytes, body: bytes, enqueued_ns: int, limits: Limits,
               prompts: Prompts = NO_PROMPTS) -> Job:
    """One backend request as a Job, its texts behind the prompt it asks for (or the model's
    default); BadBody (with the protocol code) if its body is wrong."""
    asked = decode_body(op, body, enqueued_ns, limits)
    try:
        prompt = prompts.text_of(asked.prompt_name)
    except KeyError:
        raise item_error(protocol.BAD_REQUEST, (protocol.PROMPT_NAME_KEY,),
                         f"is {asked.prompt_name!r}, not one of this version's prompts ("
                         f"{', '.join(prompts.named) or 'its model declares none'})") from None
    texts = [prompt + text for text in asked.texts] if prompt else asked.texts
    return Job(seq, op, texts, asked.size, truncate=asked.truncate)


def start_tokenizer_threads(count: int) -> None:
    """Start the Rust tokenizer's thread pool (rayon's, one per process) from this thread.

    It starts at the first parallel call and its threads take the priority of the thread that
    made it: left to the warm-up on the niced loader thread, a worker would tokenise at the
    load niceness for the rest of its life (and no unprivileged process can lower it back)."""
    if count <= 1:
        return  # no pool: the tokenizer runs on the calling thread
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    any_tokenizer = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    any_tokenizer.encode_batch(["[UNK]"] * count)


def start_cuda_context(device: str) -> None:
    """Create the CUDA context from this thread, before the model loads on the niced one.

    The driver's helper threads start with the context and, like rayon's above, take the
    priority of the thread that made it: made by the loader, they would run at the load
    niceness for the rest of the worker's life."""
    import torch

    torch.cuda.set_device(device)
    torch.empty(1, device=device)


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


def pin_passes(cores: tuple[int, ...] | None) -> None:
    """This thread (the device thread) on its slot's cores; a refusal leaves it unpinned,
    said in the log, rather than failing a worker that can serve."""
    if cores is None:
        return
    try:
        pin_this_thread(cores)
    except OSError as exc:
        log.warning("forward passes not pinned to cores %s: %s", core_list_text(cores),
                    exc.strerror or exc)
        return
    log.info("forward passes on cores %s", core_list_text(cores))


def freeze_heap() -> None:
    """Take everything alive now (torch, transformers, the model) out of the collector's sight.

    Called once start-up is over, by workers and by the server. A full collection otherwise
    walks a worker's ~400k long-lived objects: 150-220 ms with the GIL held, a stall every
    request of the batch waits out (measured on a worker under load, docs/benchmarks.md).
    """
    gc.collect()
    gc.freeze()


class WorkerLoop:
    """The worker's main thread: owns the backend socket. Receives, decodes and tokenises
    requests into the job queue, forwards the device thread's replies, heartbeats, obeys
    STOP (after every job queued before it is answered) and follows the parent's death."""

    def __init__(self, cfg: WorkerConfig, sock: zmq.Socket, parent: int) -> None:
        self.cfg = cfg
        self.sock = sock
        self.parent = parent  # the server, or the forkserver that forked us
        self.stopping = False
        self.terminated = False  # SIGTERM arrived: stop as on STOP
        self.next_heartbeat = 0.0
        self.encoder: Any = None
        self.prompts = NO_PROMPTS  # its model's, once loaded
        self.settings = cfg.settings
        self.limits = Limits(self.settings.max_pairs, self.settings.max_text_chars)
        self.stats = BatchStats()  # counted by the device thread, reported with heartbeats
        self.queue = JobQueue()
        self.outbox: list[bytes] = []  # error replies of requests that never reach the queue
        self.device: DeviceThread | None = None
        self.last_beat = 0.0  # monotonic time of the last heartbeat, and the device's busy
        self.last_busy = 0.0  # seconds then: the busy % of the next one

    def run(self) -> None:
        try:
            info = self._load()
        except Exception as exc:
            # The pool learns why in one line (rotations, status and history say it), not
            # only "exited with code 1"; the traceback goes to the log.
            reason = load_failure(exc, self.cfg.path)
            log.error("loading %s failed: %s", self.cfg.path, reason)
            self.sock.send_multipart([protocol.W_FAILED, reason.encode()])
            raise
        freeze_heap()
        # From here SIGTERM is a STOP: a process group signalled as a whole (systemd's
        # KillMode=control-group, `kill -TERM -PGID`) has its workers finish what they hold
        # and exit 0 while the server drains, instead of dying with it unanswered. Loading
        # is simply ended by it (the default). (Only a process's main thread can take
        # signals: a loop run on another thread, as in tests, is stopped by STOP alone.)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)
        self.sock.send_multipart([protocol.W_READY, info.encode()])
        log.info("ready: version %s on %s (%s, %s) in %.2fs", self.cfg.version, info.device,
                 info.dtype, info.graph, info.load_seconds)
        if info.pass_overhead_tokens:
            log.info("pass planning: a forward pass costs %d tokens' worth besides its own; "
                     "at most %d padded tokens a pass", info.pass_overhead_tokens,
                     self.encoder.chunk_tokens if self.encoder else 0)
        if info.graph_note:
            log.warning("forward passes run eager: the model could not be traced (%s)",
                        info.graph_note)
        if info.fused_linears:
            log.info("bf16 graph: %d linears through oneDNN, the feed-forward GELU folded in",
                     info.fused_linears)
        if info.fusion_note:
            log.warning("bf16 graph with torch's linears: the oneDNN one failed (%s)",
                        info.fusion_note)
        encoder = self.encoder
        if encoder is not None:
            self.prompts = encoder.prompts
            if encoder.prompts.named:
                log.info("prompts: %s; default %s", ", ".join(encoder.prompts.named),
                         encoder.prompts.default or "none (texts as given)")

        def embed(ids: list[list[int]]) -> Any:
            assert encoder is not None and self.device is not None
            return encoder.embed_tokens(ids, on_chunk=self.device.note_progress).numpy()

        self.device = DeviceThread(
            self.queue, self.cfg.version, self.cfg.max_batch, self.settings.max_wait_ms,
            embed=None if encoder is None else embed, stats=self.stats,
            on_failure=recover_device,
            max_batch_tokens=self.settings.max_batch_tokens, thresholds=self.cfg.thresholds,
            pipelined=self.settings.passes == "pipelined")
        if encoder is None:
            # The echo model has no device to overlap with: its "passes" run right here,
            # without two thread hops per request.
            self._serve(None)
            log.info("stopped")
            return
        pair = self.sock.context.socket(zmq.PAIR)
        pair.setsockopt(zmq.LINGER, 0)
        endpoint = f"inproc://zeropool-passes-{id(self):x}"
        pair.bind(endpoint)
        thread = self._start_device_thread(endpoint)
        try:
            self._serve(pair)
        finally:
            self.queue.close()
            thread.join(DEVICE_JOIN_S)
            pair.close(linger=0)
        log.info("stopped")

    def _on_sigterm(self, _signum: int, _frame: object) -> None:
        self.terminated = True  # the loop acts on it (a signal handler must not touch sockets)

    def _stop_on_sigterm(self) -> None:
        if self.terminated and not self.stopping:
            log.info("SIGTERM: answering the %d requests queued here, then exiting",
                     len(self.queue))
            self.stopping = True
            self.queue.close()

    def _load(self) -> ReadyInfo:
        start = time.perf_counter()
        me = {"version": self.cfg.version, "worker_id": self.cfg.worker_id, "pid": os.getpid(),
              "capacity": self.cfg.capacity, "max_batch": self.cfg.max_batch,
              "device": self.cfg.device}
        if self.settings.model == "echo":
            return ReadyInfo(**me)
        device = "cuda:0" if self.cfg.device.startswith("cuda") else self.cfg.device
        start_tokenizer_threads(self.settings.tokenizer_threads)
        if device.startswith("cuda"):
            start_cuda_context(device)
        with ThreadPoolExecutor(1, thread_name_prefix="zeropool-load") as loader:
            self.encoder, warm_up_seconds = loader.submit(load_encoder, self.cfg,
                                                          device).result()
        import torch  # imported by the loader already

        return ReadyInfo(
            **me, load_seconds=round(time.perf_counter() - start, 3),
            warm_up_seconds=round(warm_up_seconds, 3),
            dtype=str(self.encoder.dtype).removeprefix("torch."),
            graph=self.encoder.graph, graph_note=self.encoder.graph_note,
            pooling=self.encoder.pooling, prompt=self.encoder.prompts.default or "",
            fused_linears=self.encoder.fused_linears, fusion_note=self.encoder.fusion_note,
            dim=self.encoder.dim,
            max_length=self.encoder.max_length,
            pass_overhead_tokens=self.encoder.overhead_tokens,
            gpu_memory_bytes=(torch.cuda.memory_reserved() if device.startswith("cuda") else 0),
        )

    def _start_device_thread(self, endpoint: str) -> threading.Thread:
        device = self.device
        assert device is not None

        def run_passes() -> None:
            import torch  # loaded already, with the model

            # Before torch's threads start: they inherit it.
            pin_passes(self.settings.passes_cores_of(self.cfg.slot))
            torch.set_num_threads(self.settings.threads)  # per thread with OpenMP
            pair = self.sock.context.socket(zmq.PAIR)
            pair.setsockopt(zmq.LINGER, 0)
            pair.connect(endpoint)
            try:
                device.run(pair)
            finally:
                pair.close(linger=0)

        thread = threading.Thread(target=run_passes, name="zeropool-device", daemon=True)
        thread.start()
        return thread

    def _serve(self, pair: zmq.Socket | None) -> None:
        """Until the device thread is done after a STOP (no `pair`, the echo model: until
        the STOP), or the parent is gone."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        if pair is not None:
            poller.register(pair, zmq.POLLIN)
        self.next_heartbeat = time.monotonic() + self.cfg.heartbeat_s
        reading = True
        while True:
            ready = dict(poller.poll(int(self.cfg.heartbeat_s * 1000)))
            self._stop_on_sigterm()
            if self.stopping and reading:
                # What the router sends from now on stays unread (it re-runs it once this
                # worker has exited); left in the poller, it would wake every poll at once.
                poller.unregister(self.sock)
                reading = False
            if pair is not None and pair in ready and self._forward_replies(pair):
                return
            if pair is None and self.stopping:
                self._serve_queued_here()
                return
            if self.sock in ready and not self.stopping:
                self._intake()
                if pair is None:
                    self._serve_queued_here()
                    if self.stopping:
                        return
            self._heartbeat_if_due()
            if os.getppid() != self.parent:
                log.warning("parent process is gone; exiting")
                return

    def _forward_replies(self, pair: zmq.Socket) -> bool:
        """Send on every reply message the device thread has made; True once it is done."""
        while True:
            try:
                frames = pair.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
            first = frames[0].bytes
            if first == PASSES_DONE:
                return True
            if first == PASSES_CRASHED:
                raise RuntimeError("the device thread failed (logged above); exiting so that "
                                   "the pool re-runs this worker's requests")
            self.sock.send_multipart(frames, copy=False)

    def _heartbeat_if_due(self) -> None:
        now = time.monotonic()
        if now < self.next_heartbeat:
            return
        device = self.device
        if device is not None:
            if device.pass_started and now - device.progressed_at > self.cfg.heartbeat_s:
                # No part of the pass has finished for this long: it may be stuck. Silence
                # lets the supervisor judge, as it did when passes ran on this thread. (A long
                # pass is many parts, each seconds at most: pool.runtime.CHUNK_SECONDS.)
                return
            busy = device.busy_seconds(now)
            if self.last_beat:
                # Clamped: a pass that ends while it is read is counted at its end.
                share = (busy - self.last_busy) / max(now - self.last_beat, 1e-9)
                self.stats.busy_percent = round(100 * min(max(share, 0.0), 1.0), 1)
            self.last_beat, self.last_busy = now, busy
        self.sock.send_multipart([protocol.W_HEARTBEAT, self.stats.encode()])
        self.next_heartbeat = now + self.cfg.heartbeat_s

    # -- intake ------------------------------------------------------------------------

    def _intake(self) -> None:
        """Everything waiting on the socket (up to INTAKE_MESSAGES messages), decoded and
        tokenised into the queue; bad bodies are answered at once."""
        jobs: list[Job] = []
        now_ns = time.monotonic_ns()
        for _ in range(INTAKE_MESSAGES):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if frames[0] == protocol.W_STOP:
                self.stopping = True
                break
            if frames[0] == protocol.W_REQUEST and len(frames) == 2:
                self._decode(frames[1], jobs, now_ns)
        for part in chunks_of_texts(jobs, TOKENIZE_CHUNK_TEXTS):
            self.queue.put(self._tokenized(part))
        if jobs and self.device is not None:
            self.device.note_preparation((time.monotonic_ns() - now_ns) / 1e9,
                                         sum(len(job.texts) for job in jobs))
        if self.stopping:
            self.queue.close()
        if self.outbox:
            self.sock.send_multipart([protocol.W_REPLY, b"".join(self.outbox)])
            self.outbox = []

    def _serve_queued_here(self) -> None:
        assert self.device is not None
        for message in self.device.serve_queued():
            self.sock.send_multipart(message)

    def _decode(self, packed: bytes, jobs: list[Job], now_ns: int) -> None:
        # A message that does not parse is the router's bug: its requests are lost to this
        # worker, and the router re-runs them elsewhere when this worker is stopped or lost.
        try:
            requests = protocol.split_requests(packed)
        except protocol.BadEntries:
            log.exception("a request message from the router does not parse")
            return
        for seq, enqueued_ns, op, body in requests:
            try:
                job = decode_job(seq, op, body, enqueued_ns, self.limits, self.prompts)
            except BadBody as exc:
                self._reply_error(seq, exc.code, str(exc), exc.at)
                continue
            job.received_ns, job.transit_ns = now_ns, now_ns - enqueued_ns
            jobs.append(job)

    def _tokenized(self, jobs: list[Job]) -> list[Job]:
        """The jobs with their token ids (each distinct text tokenised once); a job whose
        texts the tokenizer fails on gets its error reply instead."""
        if self.encoder is None:
            return jobs
        try:
            unique = list(dict.fromkeys(t for job in jobs for t in job.texts))
            ids = dict(zip(unique, self.encoder.token_ids(unique), strict=True))
        except Exception as exc:
            if len(jobs) == 1:
                log.exception("tokenizing request %s failed", jobs[0].seq.hex())
                self._reply_error(jobs[0].seq, protocol.INTERNAL,
                                  f"{type(exc).__name__}: {exc}"[:500])
                return []
            return [ok for job in jobs for ok in self._tokenized([job])]
        limit = self.encoder.vocab_limit
        kept = []
        for job in jobs:
            job.ids = [ids[t] for t in job.texts]
            job.tokens = sum(map(len, job.ids))
            if limit is not None and any(i >= limit for row in job.ids for i in row):
                # The model's fault, not the producer's: internal, as a failed pass would be.
                self._reply_error(job.seq, protocol.INTERNAL, f"a text holds a token the model "
                                  f"has no embedding for (its table has {limit} rows): the "
                                  "tokenizer is not the model's")
                continue
            if not job.truncate and self._refused_untruncated(job):
                continue
            kept.append(job)
        return kept

    def _refused_untruncated(self, job: Job) -> bool:
        """For a request sent with `truncate: false`: its first text over the model's input
        limit gets it a too_large reply (True), as text-embeddings-inference does."""
        over = self.encoder.token_ids.over_limit(job.texts)
        if not over:
            return False
        index, tokens = min(over.items())
        at = text_place(job.op, index)
        limit = self.encoder.max_length
        error = item_error(protocol.TOO_LARGE, at, f"has {tokens} tokens, over version "
                           f"{self.cfg.version}'s input limit of {limit}: shorten it, or let "
                           f"the pool truncate it (the default) to its first {limit} tokens")
        self._reply_error(job.seq, error.code, str(error), error.at)
        return True

    def _reply_error(self, seq: bytes, code: str, message: str,
                     at: protocol.JsonPath | None = None) -> None:
        self.outbox.append(protocol.error_entry(seq, code, message, at))


# Long enough for transformers' messages, whose remedy often comes last ("You need to have
# sentencepiece installed ..."), short enough for a status line.
LOAD_FAILURE_CHARS = 600


def load_failure(exc: BaseException, path: str) -> str:
    """An exception of a model load as one line: its type and its message's lines joined, the
    file where the exception names one, else the model directory."""
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    where = getattr(exc, "filename", None) or path
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return f"{text[:LOAD_FAILURE_CHARS]} ({where})"


class DeviceLost(RuntimeError):
    """The CUDA context is broken (a device-side assert is sticky): no pass can run again."""


def recover_device() -> None:
    """After a failed pass: free the device's cached memory. Raises DeviceLost where the
    CUDA context no longer works, so that the worker exits and a fresh one takes its place
    (it would otherwise answer every request with an error, and keep heartbeating)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    try:
        torch.cuda.synchronize()
    except Exception as exc:
        raise DeviceLost(f"the CUDA context failed after a pass: {exc}") from exc
    try:
        torch.cuda.empty_cache()
    except Exception:  # best effort: an out-of-memory pass leaves a working context
        pass


def chunks_of_texts(jobs: list[Job], max_texts: int) -> list[list[Job]]:
    """`jobs` in order, cut into runs of at most `max_texts` texts (a job over it alone)."""
    parts: list[list[Job]] = []
    texts = max_texts
    for job in jobs:
        if texts + len(job.texts) > max_texts:
            parts.append([])
            texts = 0
        parts[-1].append(job)
        texts += len(job.texts)
    return parts
