"""A worker process's set-up: everything between multiprocessing's start and the loop.

Pin the device before torch sees CUDA, follow the parent's death, log in the pool's format,
own one DEALER socket to the router's backend, then hand over to pool.worker.WorkerLoop;
exit without the interpreter's (torch's) slow teardown.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys

import psutil
import zmq

from pool.logs import JsonLogFormatter
from pool.worker import WorkerConfig, WorkerLoop

PR_SET_PDEATHSIG = 1
SOCKET_LINGER_MS = 2000  # the last replies get this long to leave at exit


def worker_main(cfg: WorkerConfig) -> None:
    """Process entry point (multiprocessing `spawn` or `forkserver`, pool.startmethod)."""
    parent = os.getppid()
    _pin_device(cfg)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the forkserver ignores it (pool.preload)
    _release_forkserver_pipe()
    _die_with_parent()
    if os.getppid() != parent or not _serves(parent, cfg.server_pid):
        os._exit(0)  # its parent died before PDEATHSIG was armed, or before `parent` was read
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if cfg.settings.log_json else logging.Formatter(
        f"%(asctime)s worker {cfg.worker_id} %(levelname)s %(message)s"))
    handler.addFilter(lambda record: setattr(record, "worker", cfg.worker_id) or True)
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, cfg.worker_id.encode())
    sock.setsockopt(zmq.LINGER, SOCKET_LINGER_MS)
    sock.connect(cfg.settings.backend_endpoint)
    try:
        WorkerLoop(cfg, sock, parent).run()
    finally:
        sock.close()
        ctx.term()  # delivers the last replies (LINGER bounds it)
    # Nothing left to flush: skip the interpreter's (torch's) slow teardown.
    logging.shutdown()
    os._exit(0)


def _serves(parent: int, server_pid: int) -> bool:
    """Whether `parent` is the serve process or its forkserver: read after the parent
    died, getppid() names init or a subreaper, whose death signal would never come."""
    if parent == server_pid:
        return True
    try:
        return psutil.Process(parent).ppid() == server_pid
    except psutil.Error:
        return False


def _pin_device(cfg: WorkerConfig) -> None:
    # Must happen before torch initialises CUDA (a forkserver imports torch, never CUDA).
    if cfg.device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = cfg.device.split(":", 1)[1]
    for key, value in worker_env(cfg.settings.threads).items():
        os.environ.setdefault(key, value)
    # Set, not defaulted: the forkserver's environment says false for every worker. The Rust
    # tokenizer reads these at its first parallel call, which no parent ever made.
    tokenizer_threads = cfg.settings.tokenizer_threads
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if tokenizer_threads > 1 else "false"
    os.environ["RAYON_NUM_THREADS"] = str(tokenizer_threads)


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
