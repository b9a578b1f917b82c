"""Starting worker processes: the one place that knows multiprocessing and signals.

The supervisor asks a `Spawner` for a process and holds what it gets back through the small
`WorkerProcess` interface, so its state machine runs the same against fake processes in
tests (tests/test_supervisor_unit.py) as against real ones here.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Protocol

from pool import config
from pool.bootstrap import worker_main
from pool.startmethod import (
    ForkserverError,
    forkserver_exited,
    stop_forkserver,
    warm_forkserver,
    worker_context,
)
from pool.worker import WorkerConfig

log = logging.getLogger("zeropool.processes")


class SpawnPending(Exception):
    """No process can start yet (the forkserver is being restarted): try again later."""


class SpawnFailed(RuntimeError):
    """No process could start (the forkserver did not come back)."""


class WorkerProcess(Protocol):
    """A started worker process, as the supervisor uses it."""

    @property
    def pid(self) -> int: ...

    @property
    def exitcode(self) -> int | None:
        """None while it runs; never blocks."""

    def signal(self, signum: int) -> None:
        """Deliver `signum`; a process that has exited already is no error."""

    def reap(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for it to exit, then release its resources."""


Spawner = Callable[[WorkerConfig], WorkerProcess]


class ChildProcess:
    """A worker started by multiprocessing (spawn or forkserver)."""

    def __init__(self, process: BaseProcess) -> None:
        assert process.pid is not None  # set by start(); never 0, which would signal our group
        self.process = process
        self._pid = process.pid

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode  # non-blocking waitpid

    def signal(self, signum: int) -> None:
        try:
            os.kill(self._pid, signum)
        except ProcessLookupError:
            pass

    def reap(self, timeout: float) -> None:
        self.process.join(timeout)
        if self.process.exitcode is not None:
            self.process.close()


class Launcher:
    """Spawner of real worker processes by the pool's start method (pool.startmethod)."""

    def __init__(self, start_method: str, threads: int) -> None:
        self.start_method = start_method
        self.threads = threads
        self._mp = worker_context(start_method, threads)
        self._restart: threading.Thread | None = None
        self._restart_error: str | None = None

    def __call__(self, cfg: WorkerConfig) -> WorkerProcess:
        if self.start_method == "forkserver":
            self._check_forkserver()
        process = self._mp.Process(target=worker_main, args=(cfg,),
                                   name=f"zeropool-{cfg.worker_id}")
        process.start()
        return ChildProcess(process)

    def _check_forkserver(self) -> None:
        """Raise SpawnPending while a killed forkserver is restarted; SpawnFailed if it did
        not come back. A new one imports torch again (seconds, minutes on a loaded machine):
        that happens on a thread of its own, which touches no socket, so that the serving
        loop goes on answering producers and operators meanwhile."""
        if self._restart is not None:
            if self._restart.is_alive():
                raise SpawnPending("the worker forkserver is restarting")
            self._restart = None
            if self._restart_error is not None:
                error, self._restart_error = self._restart_error, None
                raise SpawnFailed(error)
        if forkserver_exited():
            log.error("the worker forkserver exited; starting a new one")
            self._restart = threading.Thread(target=self._restart_forkserver,
                                             name="zeropool-forkserver-restart", daemon=True)
            self._restart.start()
            raise SpawnPending("the worker forkserver is restarting")

    def _restart_forkserver(self) -> None:
        try:
            warm_forkserver(self._mp, self.threads)
        except ForkserverError as exc:
            self._restart_error = str(exc)

    def close(self) -> None:
        if self._restart is not None:
            self._restart.join(config.TERM_GRACE_S)  # bounded: it is stopped next
        stop_forkserver()
