"""Where a bench run's time went: CPU of the pool's router, its workers and the producers
(psutil), how busy the pool's GPUs were (NVML), and the workers' own timers (how busy each
device thread was; a request's time to the worker, queued in it and in its pass), over the
load.

CPU is in percent of one core (200 = two cores busy), from each process's own CPU seconds:
the router and the workers are read from the pool's status at the start and every
STATUS_EVERY_S (workers a rotation starts are picked up; one that exits is counted up to
its last reading), the producers report their own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from pool.control import ControlError, control_request
from pool.system import gpu_stats

STATUS_EVERY_S = 2.0  # how often the meter re-reads which workers the pool has


@dataclass
class Meter:
    """One process's CPU seconds at its first reading and at its latest."""

    role: str  # "router" or "workers"
    process: psutil.Process
    first: float  # CPU seconds at the first reading (0 for a process started meanwhile)
    last: float

    def read(self) -> None:
        try:
            self.last = cpu_seconds(self.process)
        except psutil.Error:
            pass  # exited: its last reading stands


@dataclass
class UsageMeter:
    """Reads the pool's processes and GPUs while a load runs (`tick`), then `report`s."""

    state_dir: Path
    started: float = field(default_factory=time.monotonic)
    meters: dict[int, Meter] = field(default_factory=dict)
    gpu_busy: dict[int, list[float]] = field(default_factory=dict)
    gpus: set[int] = field(default_factory=set)  # indices the pool's workers run on
    next_status: float = 0.0
    # worker pid -> its batching totals (pool.reports.BatchStats) at the first and the
    # latest status reading
    batching: dict[int, tuple[dict, dict]] = field(default_factory=dict)

    @classmethod
    def start(cls, state_dir: Path | None) -> UsageMeter | None:
        """A meter on the pool of `state_dir`, or None when there is no pool to read."""
        if state_dir is None:
            return None
        meter = cls(Path(state_dir))
        try:
            meter._discover(first=True)
        except (ControlError, OSError):
            return None
        return meter

    def tick(self) -> None:
        now = time.monotonic()
        for meter in self.meters.values():
            meter.read()
        if now >= self.next_status:
            try:
                self._discover(first=False)
            except (ControlError, OSError):
                pass  # the pool is busy or stopping; the known processes are still read
        if self.gpus:
            gpus, _ = gpu_stats()
            for gpu in gpus:
                if gpu["index"] in self.gpus and gpu["load_percent"] is not None:
                    self.gpu_busy.setdefault(gpu["index"], []).append(gpu["load_percent"])

    def _discover(self, first: bool) -> None:
        status = control_request(self.state_dir, "status")
        self.next_status = time.monotonic() + STATUS_EVERY_S
        found = [("router", status["pid"])] + [("workers", w["pid"]) for w in status["workers"]]
        for role, pid in found:
            if pid in self.meters:
                continue
            try:
                process = psutil.Process(pid)
                now = cpu_seconds(process)
            except psutil.Error:
                continue
            self.meters[pid] = Meter(role, process, now if first else 0.0, now)
        self.gpus |= {int(w["device"].partition(":")[2]) for w in status["workers"]
                      if w["device"].startswith("cuda:")}
        for w in status["workers"]:
            stats = w.get("batching") or {}
            if stats:
                earlier = self.batching.get(w["pid"], ({} if not first else stats, {}))[0]
                self.batching[w["pid"]] = (earlier, stats)

    def report(self, producer_cpu_s: float) -> dict[str, Any]:
        """The figures over the load: CPU % of one core per role, GPU busy % per GPU, the
        workers' device threads' busy % and a request's time in the pool by stage."""
        self.next_status = 0.0  # the workers' latest totals
        self.tick()
        seconds = max(time.monotonic() - self.started, 1e-9)

        def percent(cpu_s: float) -> float:
            return round(100 * cpu_s / seconds, 1)

        workers = {pid: m.last - m.first for pid, m in self.meters.items()
                   if m.role == "workers"}
        router = sum(m.last - m.first for m in self.meters.values() if m.role == "router")
        usage: dict[str, Any] = {
            "seconds": round(seconds, 2), "cores": psutil.cpu_count() or 0,
            "cpu_percent": {"router": percent(router), "workers": percent(sum(workers.values())),
                            "producers": percent(producer_cpu_s)},
            "per_worker_cpu_percent": {str(pid): percent(s) for pid, s in workers.items()},
        }
        usage |= self._worker_times()
        if self.gpu_busy:
            usage["gpu_busy_percent"] = {str(i): round(sum(v) / len(v), 1)
                                         for i, v in sorted(self.gpu_busy.items())}
        return usage


    def _worker_times(self) -> dict[str, Any]:
        """From the workers' own timers over the load: how busy each device thread was, and
        where a request's time inside the pool went (means, ms)."""
        def delta(key: str) -> dict[int, float]:
            return {pid: last.get(key, 0) - first.get(key, 0)
                    for pid, (first, last) in self.batching.items()}

        busy, idle = delta("device_busy_s"), delta("device_idle_s")
        requests = sum(delta("requests").values())
        # A worker that ran no pass over the load (the router sent it nothing) was idle
        # throughout: 0, not left out.
        out: dict[str, Any] = {"device_busy_percent": {
            str(pid): round(100 * busy[pid] / (busy[pid] + idle[pid]), 1)
            if busy[pid] + idle[pid] > 0 else 0.0 for pid in busy}}
        if requests:
            out["request_ms"] = {
                stage: round(1000 * sum(delta(key).values()) / requests, 2)
                for stage, key in (("to_worker", "request_transit_s"),
                                   ("queued_in_worker", "request_queued_s"),
                                   ("in_pass", "request_pass_s"))}
        return out


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system
