"""Start a `pool serve` as a child process and wait for it: for the demo, bench and tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from router.client import Client, ZeroPoolError

READY_POLL_S = 0.2


class PoolProcess:
    """A `pool serve` subprocess whose stderr goes to `log_path`."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 own_group: bool = False, prefix: tuple[str, ...] = ()) -> None:
        """`own_group`: the pool leads a process group of its own, its workers in it (as
        under systemd), so that the whole group can be signalled. `prefix`: a command that
        execs the pool, e.g. `ip netns exec NS` (the tests' machines in network namespaces)."""
        self.args = args
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "cli.main", "serve", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            process_group=0 if own_group else None,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def wait_ready(self, endpoint: str, workers: int = 1, timeout: float = 180.0,
                   version: str | None = None) -> None:
        """Until `workers` workers answer through `endpoint`; raise if the pool dies first."""
        deadline = time.monotonic() + timeout
        with Client(endpoint, timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"pool serve exited with {self.proc.returncode}:\n"
                                       f"{self.log_tail()}")
                try:
                    if client.ping(version=version, timeout=1.0).workers >= workers:
                        return
                except ZeroPoolError:
                    pass
                time.sleep(READY_POLL_S)
        raise TimeoutError(f"pool not ready within {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait, SIGKILL as a last resort; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> PoolProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PrivatePool:
    """A throwaway pool in a fresh temporary state directory, on an ipc endpoint inside it
    (the demo, `pool bench --spawn`). `close()` stops it and removes the directory."""

    def __init__(self, workers: int, path: str | None = None, extra: tuple[str, ...] = (),
                 prefix: str = "zp-") -> None:
        self.workers = workers
        self.state_dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.endpoint = f"ipc://{self.state_dir}/front.sock"
        args = ["--workers", str(workers), "--bind", self.endpoint,
                "--state-dir", str(self.state_dir), *extra]
        if path:
            args += ["--path", path]
        self.process = PoolProcess(args, self.state_dir / "console.log")

    def wait_ready(self, timeout: float = 300.0) -> None:
        self.process.wait_ready(self.endpoint, workers=self.workers, timeout=timeout)

    def close(self) -> int:
        try:
            return self.process.stop()
        finally:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def wait_http(url: str, path: str = "/health", timeout: float = 30.0) -> None:
    """Until GET url+path answers 200 (an HTTP door or server starting); SystemExit after
    `timeout` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(READY_POLL_S)
    raise SystemExit(f"{url}{path} never answered 200")
