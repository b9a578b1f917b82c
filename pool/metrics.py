"""What the pool counts: Prometheus metrics, requests/s for status, error rates for health.

Two kinds of figures, and why the exporter thread is safe beside the one serve loop:
- per reply (`zeropool_requests_total`, `zeropool_request_duration_seconds`): the broker's
  reply observer, called in the serve loop, updates prometheus_client objects (thread-safe).
- pool state (workers, queues, batch sizes from worker heartbeats, restarts, the machine):
  the serve loop rebuilds an immutable list of metric families every REFRESH_S; the HTTP
  thread of prometheus_client only ever reads that list, never the broker or supervisor.
Worker-side figures (batch sizes) reach this one endpoint through heartbeats, so there is
no multiprocess-mode directory to manage; a dead worker's counts are kept as of its last
heartbeat.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pool import config as c
from router import protocol as p

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from pool.rotation import Rotation
    from pool.supervisor import Supervisor
    from router.broker import Broker

log = logging.getLogger("zeropool.metrics")

REFRESH_S = 1.0
RECENT_WINDOW_S = 60  # what health's error rate looks at
RATE_WINDOW_S = 10  # what status' requests/s looks at
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)
PHASE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
WORKER_STATES = ("loading", "checking", "ready", "draining", "stopping")
# Replies that say the pool, not the producer, fell short: these count against health.
POOL_FAULTS = frozenset({p.INTERNAL, p.WORKER_FAILED, p.TIMEOUT, p.OVERLOADED})
NO_LABEL = "none"


class RecentReplies:
    """Replies per whole second over the last RECENT_WINDOW_S, by (version, code)."""

    def __init__(self) -> None:
        self._seconds: deque[tuple[int, Tally[tuple[str, str]]]] = deque()

    def add(self, version: str, code: str, now: float) -> None:
        second = int(now)
        if not self._seconds or self._seconds[-1][0] != second:
            self._seconds.append((second, Tally()))
            while self._seconds[0][0] <= second - RECENT_WINDOW_S:
                self._seconds.popleft()
        self._seconds[-1][1][(version, code)] += 1

    def per_second(self, now: float, window_s: int = RATE_WINDOW_S) -> float:
        """Replies per second over the last `window_s` complete seconds."""
        since = int(now) - window_s
        total = sum(sum(t.values()) for s, t in self._seconds if since <= s < int(now))
        return total / window_s

    def by_code(self, version: str, now: float) -> Tally[str]:
        """Replies of `version` by code over the last RECENT_WINDOW_S."""
        since = int(now) - RECENT_WINDOW_S
        out: Tally[str] = Tally()
        for second, tally in self._seconds:
            if second > since:
                for (v, code), n in tally.items():
                    if v == version:
                        out[code] += n
        return out


class StateCollector(Collector):
    """Hands prometheus_client the families the serve loop last built."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return self.families  # replaced whole, never mutated: safe to read from the thread


class BatchTotals:
    """Batch-size histogram per version, summed over live and exited workers."""

    def __init__(self) -> None:
        self._live: dict[str, tuple[str, dict]] = {}  # worker id -> (version, last stats)
        self._retired: dict[str, tuple[list[int], int]] = {}  # version -> (counts, items)

    def update(self, rows: list[dict]) -> None:
        seen = {row["id"]: (row["version"], row["batching"]) for row in rows
                if row.get("batching")}
        for wid, (version, stats) in self._live.items():
            if wid not in seen:
                self._add(self._retired, version, stats)
        self._live = seen

    def totals(self) -> dict[str, tuple[list[int], int]]:
        out = {v: (list(counts), items) for v, (counts, items) in self._retired.items()}
        for version, stats in self._live.values():
            self._add(out, version, stats)
        return out

    @staticmethod
    def _add(into: dict[str, tuple[list[int], int]], version: str, stats: dict) -> None:
        counts = stats.get("batch_size_counts") or []
        have, items = into.get(version, ([0] * (len(c.BATCH_SIZE_BUCKETS) + 1), 0))
        into[version] = ([a + b for a, b in zip(have, counts, strict=False)] + have[len(counts):],
                         items + int(stats.get("batch_items", 0)))


class PoolMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("zeropool_requests", "Replies sent to producers.",
                                ["version", "op", "status"], registry=self.registry)
        self.duration = Histogram(
            "zeropool_request_duration_seconds",
            "Arrival at the router to reply, for requests that were queued for a worker.",
            ["version", "op"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.rotations = Counter("zeropool_rotations", "Finished rotations.", ["outcome"],
                                 registry=self.registry)
        self.rotation_phase = Histogram(
            "zeropool_rotation_phase_seconds", "Time rotations spent in each phase.",
            ["phase"], buckets=PHASE_BUCKETS, registry=self.registry)
        self.recent = RecentReplies()
        self.state = StateCollector()
        self.registry.register(self.state)
        self.batches = BatchTotals()
        self.started = time.time()
        self.http: WSGIServer | None = None
        self._children: dict[tuple[str, bytes, str], tuple[Any, Any]] = {}

    # -- fed by the serve loop ---------------------------------------------------------------

    def on_reply(self, version: str, op: bytes, code: str, seconds: float | None) -> None:
        children = self._children.get((version, op, code))
        if children is None:
            labels = (version or NO_LABEL, op.decode(errors="replace") or NO_LABEL)
            children = (self.requests.labels(*labels, code), self.duration.labels(*labels))
            self._children[(version, op, code)] = children
        children[0].inc()
        if seconds is not None:
            children[1].observe(seconds)
        self.recent.add(version, code, time.monotonic())

    def on_rotation_finished(self, rot: Rotation) -> None:
        self.rotations.labels(rot.outcome or "unknown").inc()
        for phase, seconds in rot.timings.items():
            self.rotation_phase.labels(phase).observe(seconds)

    def refresh(self, broker: Broker, supervisor: Supervisor, system: dict) -> None:
        rows = supervisor.worker_rows()
        self.batches.update(rows)
        self.state.families = [*self._pool_families(broker, supervisor, rows),
                               *self._system_families(system)]

    # -- the exporter ------------------------------------------------------------------------

    def serve_http(self, host: str, port: int) -> int:
        """Start prometheus_client's exporter thread; returns the port (0 picks a free one)."""
        self.http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self.http.server_port

    def close(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None

    # -- families ----------------------------------------------------------------------------

    def _pool_families(self, broker: Broker, supervisor: Supervisor,
                       rows: list[dict]) -> list[Metric]:
        versions = sorted(set(supervisor.plans) | set(broker.lanes))
        up = GaugeMetricFamily("zeropool_up", "1 while the pool serves.")
        up.add_metric([], 1.0)
        uptime = GaugeMetricFamily("zeropool_uptime_seconds", "Seconds since the pool started.")
        uptime.add_metric([], time.time() - self.started)
        active = GaugeMetricFamily("zeropool_active_version",
                                   "Share of unpinned traffic per version (1 = all of it).",
                                   labels=["version"])
        if broker.active:
            share = broker.canary[1] if broker.canary else 0.0
            active.add_metric([broker.active], 1.0 - share)
            if broker.canary:
                active.add_metric([broker.canary[0]], share)
        queue = GaugeMetricFamily("zeropool_queue_depth", "Requests waiting for a worker.",
                                  labels=["version"])
        inflight = GaugeMetricFamily("zeropool_inflight", "Requests inside workers.",
                                     labels=["version"])
        workers = GaugeMetricFamily("zeropool_workers", "Worker processes by state.",
                                    labels=["version", "state"])
        rss = GaugeMetricFamily("zeropool_worker_rss_bytes", "Resident memory of the workers.",
                                labels=["version"])
        gpu = GaugeMetricFamily("zeropool_worker_gpu_memory_bytes",
                                "GPU memory the workers' models hold.", labels=["version"])
        for version in versions:
            queue.add_metric([version], broker.queue_length(version))
            mine = [r for r in rows if r["version"] == version]
            inflight.add_metric([version], sum(r["inflight"] for r in mine))
            for state in WORKER_STATES:
                workers.add_metric([version, state], sum(r["state"] == state for r in mine))
            rss.add_metric([version], sum(r["rss_bytes"] for r in mine))
            gpu.add_metric([version], sum(r["gpu_memory_bytes"] or 0 for r in mine))
        restarts = CounterMetricFamily("zeropool_worker_restarts",
                                       "Workers that died or failed and were replaced.",
                                       labels=["version"])
        for version, n in sorted(supervisor.restarts_total.items()):
            restarts.add_metric([version], n)
        return [up, uptime, active, queue, inflight, workers, rss, gpu, restarts,
                self._batch_family()]

    def _batch_family(self) -> Metric:
        family = HistogramMetricFamily("zeropool_batch_size",
                                       "Pairs or texts per forward pass.", labels=["version"])
        bounds = [str(float(b)) for b in c.BATCH_SIZE_BUCKETS] + ["+Inf"]
        for version, (counts, items) in sorted(self.batches.totals().items()):
            cumulative, running = [], 0
            for bound, n in zip(bounds, counts, strict=True):
                running += n
                cumulative.append((bound, running))
            family.add_metric([version], cumulative, sum_value=items)
        return family

    @staticmethod
    def _system_families(system: dict) -> list[Metric]:
        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], value)
            return family

        out: list[Metric] = [
            gauge("zeropool_system_cpu_percent", "Machine CPU use.", system["cpu_percent"]),
            gauge("zeropool_system_memory_used_bytes", "Machine memory in use.",
                  system["memory_used_bytes"]),
            gauge("zeropool_system_memory_total_bytes", "Machine memory.",
                  system["memory_total_bytes"]),
        ]
        load = GaugeMetricFamily("zeropool_gpu_load_percent", "GPU utilisation.", labels=["gpu"])
        used = GaugeMetricFamily("zeropool_gpu_memory_used_bytes", "GPU memory in use.",
                                 labels=["gpu"])
        total = GaugeMetricFamily("zeropool_gpu_memory_total_bytes", "GPU memory.",
                                  labels=["gpu"])
        for g in system["gpus"]:
            index = str(g["index"])
            load.add_metric([index], g["load_percent"])
            used.add_metric([index], g["memory_used_bytes"])
            total.add_metric([index], g["memory_total_bytes"])
        return [*out, load, used, total]
