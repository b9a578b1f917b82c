"""Starting worker processes: the one place that knows multiprocessing and signals.

The supervisor asks a `Spawner` for a process and holds what it gets back through the small
`WorkerProcess` interface, so its state machine runs the same against fake processes in
tests (tests/test_supervisor_unit.py) as against real ones here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Protocol

from pool.bootstrap import worker_main
from pool.startmethod import ensure_forkserver, stop_forkserver, worker_context
from pool.worker import WorkerConfig


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

    def __call__(self, cfg: WorkerConfig) -> WorkerProcess:
        if self.start_method == "forkserver":
            ensure_forkserver(self.threads)
        process = self._mp.Process(target=worker_main, args=(cfg,),
                                   name=f"zeropool-{cfg.worker_id}")
        process.start()
        return ChildProcess(process)

    def close(self) -> None:
        stop_forkserver()
