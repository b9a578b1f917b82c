"""How worker processes start: a fresh `spawn` interpreter, or a fork of a preloaded server.

A spawned worker spends 4-9 s of CPU importing torch and transformers before it even reads
its model (the weights of MiniLM take 0.1 s). On a CPU-only pool whose cores are busy
serving, that CPU comes out of serving on every rotation and every restart. A forkserver
imports them once, single-threaded and before any torch thread pool or CUDA context exists
(both break across fork); each worker is a fork of it and is ready in a fraction of a second.

`auto` uses the forkserver, on GPUs too: the forkserver never initialises CUDA (torch asks
NVML whether a GPU is there), so each forked worker creates its own CUDA context. On an H200
forked workers served fp16 scores as close to the seed as spawned ones (tests/test_gpu.py),
and a rotation under load loaded in 0.85 s instead of 9.9 s, with 0 errors and the GPU memory
given back (docs/benchmarks.md, session 5). `spawn` stays for the echo model (no torch) and
for `--start-method spawn`.

The forkserver is a child of the serve process and the parent of every worker; each worker
dies with it (PDEATHSIG), so killing it is a crash of every worker: they are restarted from
a new forkserver, and what they held is re-queued like after any crash.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from multiprocessing import forkserver
from multiprocessing.context import BaseContext

from pool import config
from pool.bootstrap import worker_env

log = logging.getLogger("zeropool.startmethod")


class ForkserverError(RuntimeError):
    """The forkserver could not start a process."""


PRELOAD = ["pool.preload"]  # what the forkserver imports once


def worker_context(method: str, threads: int) -> BaseContext:
    """The multiprocessing context workers start from; a forkserver is started and warm."""
    ctx = multiprocessing.get_context(method)
    if method != "forkserver":
        return ctx
    ctx.set_forkserver_preload(PRELOAD)
    warm_forkserver(ctx, threads)
    return ctx


def warm_forkserver(ctx: BaseContext, threads: int) -> None:
    """Start the forkserver and wait until it has imported torch (the first process it
    starts waits for that); raise ForkserverError if it cannot start one."""
    start = time.monotonic()
    ensure_forkserver(threads)
    probe = ctx.Process(target=_noop, name="zeropool-forkserver-probe")
    probe.start()
    probe.join(timeout=config.FORKSERVER_START_TIMEOUT_S)
    if probe.exitcode != 0:
        _kill(probe.pid)
        stop_forkserver()
        raise ForkserverError(f"the worker forkserver did not start a process within "
                              f"{config.FORKSERVER_START_TIMEOUT_S:.0f}s (exit {probe.exitcode})")
    log.info("worker forkserver ready in %.2fs (pid %s)", time.monotonic() - start,
             forkserver_pid())


def forkserver_exited() -> bool:
    """Whether the forkserver this process started has exited (it was killed). Does not
    reap it: multiprocessing does, when it starts the next one."""
    pid = forkserver_pid()
    if pid is None:
        return True
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def ensure_forkserver(threads: int) -> None:
    """Start the forkserver if it is not running (it inherits the workers' environment).

    Cheap when it runs. After it died (it was killed: every worker died with it), the next
    worker start waits here for a new one to import torch again.
    """
    with _environment(worker_env(threads)):
        forkserver.ensure_running()


def forkserver_pid() -> int | None:
    return forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]


def stop_forkserver() -> None:
    """Stop and reap the forkserver if this process started one (bounded wait)."""
    server = forkserver._forkserver  # type: ignore[attr-defined]
    pid = server._forkserver_pid
    if pid is None:
        return
    # Closing its "alive" pipe asks it to exit (pool.preload makes that quick); it holds
    # nothing to flush, so it is killed if it lingers.
    with contextlib.suppress(OSError):
        os.close(server._forkserver_alive_fd)
    deadline = time.monotonic() + config.TERM_GRACE_S
    while not _reaped(pid):
        if time.monotonic() > deadline:
            _kill(pid)
            deadline = float("inf")
        time.sleep(0.01)
    with contextlib.suppress(OSError, TypeError):
        os.unlink(server._forkserver_address)
    server._forkserver_pid = server._forkserver_alive_fd = server._forkserver_address = None


def _reaped(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def _kill(pid: int | None) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _noop() -> None:
    pass


@contextlib.contextmanager
def _environment(defaults: dict[str, str]) -> Iterator[None]:
    added = [k for k in defaults if k not in os.environ]
    for key in added:
        os.environ[key] = defaults[key]
    try:
        yield
    finally:
        for key in added:
            del os.environ[key]
