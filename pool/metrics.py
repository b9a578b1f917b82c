"""What the pool counts: Prometheus metrics, requests/s for status, error rates for health.

Everything is counted in the one serve loop and exported from snapshots, so prometheus_client's
HTTP thread never touches the router's or supervisor's state:
- per reply: plain-dict counts and latency buckets (`ReplyTally`, the hot path);
- pool state (workers, queues, batch sizes from worker heartbeats, restarts, the machine).
Every REFRESH_S the loop rebuilds an immutable list of metric families from both; the HTTP
thread only reads that list (and the rotation counters, prometheus_client objects, which are
thread-safe). Scrapes therefore see figures at most REFRESH_S old. Worker-side figures reach
this one endpoint through heartbeats: no multiprocess-mode directory to manage; a dead
worker's counts are kept as of its last heartbeat.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pool.judge import Traffic
from pool.reports import BATCH_SIZE_BUCKETS, BatchStats
from router import protocol

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from pool.rotation import Rotation
    from pool.supervisor import SupervisorSnapshot, WorkerView
    from router.broker import BrokerSnapshot

log = logging.getLogger("zeropool.metrics")

REFRESH_S = 1.0
RECENT_WINDOW_S = 60  # what health's error rate looks at
RATE_WINDOW_S = 10  # what status' requests/s looks at
# Steps of at most 1.5x from 1 ms to 1 s: status' p50/p99 and a bake's p99 judgement are
# interpolated inside one bucket, and a coarse bucket (10-25 ms) once made 12 ms read as 21.
LATENCY_BUCKETS = (0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
                   0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
PHASE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
WORKER_STATES = ("loading", "checking", "ready", "draining", "stopping")
# A version no longer loaded is exported this long after it went, so that scrapes (every
# 15-60 s) see its last counts, then forgotten: a pool rotated daily would otherwise export
# every version it ever served, for the life of the process.
UNLOADED_KEEP_S = 600.0
# What a version is judged on (a bake's error rate): its answers and its own faults.
JUDGED = protocol.POOL_FAULTS | {protocol.OK_CODE}
NO_LABEL = "none"


class ReplyTally:
    """Every reply counted in plain dicts: this is on the router's hot path (well under a
    microsecond a reply, where prometheus_client's locked objects cost ~4). Exported, and
    windowed for status and health, once a second from `snapshot()`."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, bytes, str], int] = {}
        self.buckets: dict[tuple[str, bytes], list[int]] = {}  # per LATENCY_BUCKETS, + +Inf
        self.sums: dict[tuple[str, bytes], float] = {}

    def add(self, version: str, op: bytes, code: str, seconds: float | None) -> None:
        key = (version, op, code)
        self.counts[key] = self.counts.get(key, 0) + 1
        if seconds is None:
            return
        where = (version, op)
        buckets = self.buckets.get(where)
        if buckets is None:
            buckets = self.buckets[where] = [0] * (len(LATENCY_BUCKETS) + 1)
            self.sums[where] = 0.0
        buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sums[where] += seconds

    def versions(self) -> set[str]:
        return {version for version, _op, _code in self.counts}

    def forget(self, version: str) -> None:
        """Drop a version's counts (its series leave the exported metrics)."""
        for key in [key for key in self.counts if key[0] == version]:
            del self.counts[key]
        for where in [where for where in self.buckets if where[0] == version]:
            del self.buckets[where], self.sums[where]

    def by_version_code(self) -> dict[tuple[str, str], int]:
        """Replies of work (similarity, embed) by version and code. Pings are left out: a
        health probe's every-second ping is not traffic, and would dilute error rates."""
        out: dict[tuple[str, str], int] = {}
        for (version, op, code), n in self.counts.items():
            if op != protocol.OP_PING:
                out[(version, code)] = out.get((version, code), 0) + n
        return out

    def buckets_by_version(self) -> dict[str, list[int]]:
        """Latency bucket counts per version, summed over ops."""
        by_version: dict[str, list[list[int]]] = {}
        for (version, _op), counts in self.buckets.items():
            by_version.setdefault(version, []).append(counts)
        return {version: _summed(ops) for version, ops in by_version.items()}


class RecentReplies:
    """Windows over snapshots of a tally's cumulative reply counts and latencies: taken once
    a second, and when a span must start at a moment exactly (a rotation's switch)."""

    def __init__(self, tally: ReplyTally) -> None:
        self.tally = tally
        # (when, replies by (version, code), latency buckets by version)
        self._snapshots: deque[tuple[float, dict[tuple[str, str], int],
                                     dict[str, list[int]]]] = deque(maxlen=RECENT_WINDOW_S + 2)

    def record(self, now: float) -> None:
        tally = self.tally
        self._snapshots.append((now, tally.by_version_code(), tally.buckets_by_version()))

    def traffic(self, version: str, since: float, strict: bool = False) -> Traffic:
        """`version`'s replies since `since` (the clock of `record`), at most RECENT_WINDOW_S
        back: what a bake judges (pool.judge). Snapshots are a second apart, so the span
        starts at the last snapshot at or before `since` (a little before it, maybe), or with
        `strict` at the first at or after it (nothing before it, maybe less after)."""
        snapshots = self._snapshots
        if not snapshots:
            return Traffic()
        new = snapshots[-1]
        if strict:
            before = next((snap for snap in snapshots if snap[0] >= since), None)
        else:
            before = next((snap for snap in reversed(snapshots) if snap[0] <= since),
                          snapshots[0])
        if before is None or before is new:
            # Nothing recorded after the span's start: nothing is known of it alone (the
            # newest snapshot alone is the version's whole past).
            return Traffic()

        codes = _counted_since(new[1], before[1])

        def count(which: frozenset[str]) -> int:
            return sum(n for (v, code), n in codes.items() if v == version and code in which)

        # What the version served or fell short on; a producer's bad request is neither.
        requests, errors = count(JUDGED), count(protocol.POOL_FAULTS)
        buckets = _buckets_since(new[2], before[2]).get(version, [])
        timed = sum(buckets)  # the replies the latencies are over (a refusal has none)
        if not timed:
            return Traffic(requests, errors)
        p99, p90 = (round(bucket_quantile(q, LATENCY_BUCKETS, buckets) * 1000, 2)
                    for q in (0.99, 0.9))
        return Traffic(requests, errors, p99, p90, latency_over=timed)

    def latency_ms(self, window_s: float = RATE_WINDOW_S) -> dict[str, float] | None:
        """p50 and p99 over (about) the last `window_s` seconds, estimated from the histogram
        buckets as Prometheus' histogram_quantile does; None without replies."""
        old, new = self._span(window_s)
        if new is None:
            return None
        counts = _summed(_buckets_since(new[2], old[2] if old is not None and old is not new
                                        else {}).values())
        if not sum(counts):
            return None
        return {name: round(bucket_quantile(q, LATENCY_BUCKETS, counts) * 1000, 2)
                for name, q in (("p50", 0.5), ("p99", 0.99))}

    def per_second(self, window_s: float = RATE_WINDOW_S) -> float:
        """All replies per second over (about) the last `window_s` seconds."""
        old, new = self._span(window_s)
        if old is None or new is None or new[0] <= old[0]:
            return 0.0
        return sum(_counted_since(new[1], old[1]).values()) / (new[0] - old[0])

    def by_code(self, version: str) -> dict[str, int]:
        """Replies of `version` by code over the last RECENT_WINDOW_S."""
        old, new = self._span(RECENT_WINDOW_S)
        if new is None:
            return {}
        since = _counted_since(new[1], old[1] if old is not None else {})
        return {code: n for (v, code), n in since.items() if v == version and n}

    def _span(self, window_s: float) -> tuple[tuple | None, tuple | None]:
        """(the oldest snapshot within window_s of the newest, the newest)."""
        if not self._snapshots:
            return None, None
        newest = self._snapshots[-1]
        for snap in self._snapshots:
            if newest[0] - snap[0] <= window_s + 0.5:
                return snap, newest
        return None, newest


def _counted_since(new: dict[tuple[str, str], int],
                   old: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    """What two records of cumulative counts differ by. A count that fell was forgotten and
    counted again from zero (a version unloaded long ago, loaded again), as Prometheus reads
    a counter's reset; one that is gone adds nothing."""
    return {key: n - old.get(key, 0) if n >= old.get(key, 0) else n for key, n in new.items()}


def _buckets_since(new: dict[str, list[int]],
                   old: dict[str, list[int]]) -> dict[str, list[int]]:
    """_counted_since for each version's latency buckets."""
    out = {}
    for version, after in new.items():
        before = old.get(version)
        reset = before is None or any(b < a for a, b in zip(before, after, strict=True))
        out[version] = after if reset else [b - a for a, b in zip(before, after, strict=True)]
    return out


def _summed(buckets: Iterable[list[int]]) -> list[int]:
    """Latency bucket counts of several versions as one."""
    return [sum(column) for column in zip(*buckets, strict=True)] or \
        [0] * (len(LATENCY_BUCKETS) + 1)


class StateCollector(Collector):
    """Hands prometheus_client the families the serve loop last built."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return self.families  # replaced whole, never mutated: safe to read from the thread


class BatchTotals:
    """Batch-size histogram per version, summed over live and exited workers."""

    def __init__(self) -> None:
        # worker id -> (version, last stats)
        self._live: dict[str, tuple[str, BatchStats]] = {}
        self._retired: dict[str, tuple[list[int], int]] = {}  # version -> (counts, items)

    def update(self, workers: list[WorkerView]) -> None:
        seen = {w.id: (w.version, w.batching) for w in workers if w.batching is not None}
        for wid, (version, stats) in self._live.items():
            if wid not in seen:
                self._add(self._retired, version, stats)
        self._live = seen

    def versions(self) -> set[str]:
        return set(self._retired) | {version for version, _ in self._live.values()}

    def forget(self, version: str) -> None:
        self._retired.pop(version, None)

    def totals(self) -> dict[str, tuple[list[int], int]]:
        out = {v: (list(counts), items) for v, (counts, items) in self._retired.items()}
        for version, stats in self._live.values():
            self._add(out, version, stats)
        return out

    @staticmethod
    def _add(into: dict[str, tuple[list[int], int]], version: str, stats: BatchStats) -> None:
        counts = stats.batch_size_counts
        have, items = into.get(version, ([0] * (len(BATCH_SIZE_BUCKETS) + 1), 0))
        into[version] = ([a + b for a, b in zip(have, counts, strict=False)] + have[len(counts):],
                         items + stats.batch_items)


class PoolMetrics:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        self.replies = ReplyTally()
        self.rotations = Counter("zeropool_rotations", "Finished rotations.", ["outcome"],
                                 registry=self.registry)
        self.rotation_phase = Histogram(
            "zeropool_rotation_phase_seconds", "Time rotations spent in each phase.",
            ["phase"], buckets=PHASE_BUCKETS, registry=self.registry)
        self.recent = RecentReplies(self.replies)
        self.state = StateCollector()
        self.registry.register(self.state)
        self.batches = BatchTotals()
        self.started = time.time()
        self.http: WSGIServer | None = None
        self._unloaded_since: dict[str, float] = {}  # exported versions no longer loaded

    # -- fed by the serve loop ---------------------------------------------------------------

    def on_rotation_finished(self, rot: Rotation) -> None:
        self.rotations.labels(rot.outcome or "unknown").inc()
        for phase, seconds in rot.timings.items():
            self.rotation_phase.labels(phase).observe(seconds)

    def refresh(self, broker: BrokerSnapshot, supervisor: SupervisorSnapshot,
                curve_refused: int | None, system: dict,
                control_refused: int | None = None) -> None:
        self.batches.update(supervisor.workers)
        now = self.clock()
        self.recent.record(now)
        self.forget_unloaded(set(supervisor.versions) | set(broker.lanes),
                             set(supervisor.restarts_total), now)
        self.state.families = [*self._reply_families(),
                               *self._pool_families(broker, supervisor, now),
                               *self._curve_families(curve_refused, control_refused),
                               *self._system_families(system)]

    def forget_unloaded(self, loaded: set[str], restarted: set[str], now: float) -> None:
        """Versions unloaded UNLOADED_KEEP_S ago leave the exported metrics."""
        exported = self.replies.versions() | self.batches.versions() | restarted
        for version in exported - loaded - {""}:  # "": requests no version took
            since = self._unloaded_since.setdefault(version, now)
            if now - since >= UNLOADED_KEEP_S:
                self.replies.forget(version)
                self.batches.forget(version)
                if version not in restarted:  # (the supervisor's count outlives it)
                    del self._unloaded_since[version]
        for version in loaded:
            self._unloaded_since.pop(version, None)

    def _exported(self, version: str, now: float) -> bool:
        since = self._unloaded_since.get(version)
        return since is None or now - since < UNLOADED_KEEP_S

    @staticmethod
    def _curve_families(refused: int | None, control_refused: int | None) -> list[Metric]:
        families = []
        if refused is not None:  # Curve on the frontend
            family = CounterMetricFamily("zeropool_curve_refused_handshakes",
                                         "CurveZMQ handshakes refused: a client key not "
                                         "allowed.")
            family.add_metric([], refused)
            families.append(family)
        if control_refused is not None:  # --control-bind
            family = CounterMetricFamily("zeropool_control_refused_handshakes",
                                         "CurveZMQ handshakes the remote control socket "
                                         "refused: a key not on --operator-keys.")
            family.add_metric([], control_refused)
            families.append(family)
        return families

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

    def _reply_families(self) -> list[Metric]:
        requests = CounterMetricFamily("zeropool_requests", "Replies sent to producers; "
                                       "status is ok or the error code.",
                                       labels=["version", "op", "status"])
        for (version, op, code), n in sorted(self.replies.counts.items()):
            requests.add_metric([*_labels(version, op), code], n)
        duration = HistogramMetricFamily(
            "zeropool_request_duration_seconds",
            "Arrival at the router to reply, for requests that were queued for a worker.",
            labels=["version", "op"])
        bounds = [str(b) for b in LATENCY_BUCKETS] + ["+Inf"]
        for (version, op), counts in sorted(self.replies.buckets.items()):
            duration.add_metric(_labels(version, op), _cumulative(bounds, counts),
                                sum_value=self.replies.sums[(version, op)])
        return [requests, duration]

    def _pool_families(self, broker: BrokerSnapshot, supervisor: SupervisorSnapshot,
                       now: float) -> list[Metric]:
        versions = sorted(set(supervisor.versions) | set(broker.lanes))
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
        busy = GaugeMetricFamily(
            "zeropool_worker_device_busy_ratio", "Share of the last heartbeat interval the "
            "workers' device threads spent in forward passes (mean over workers).",
            labels=["version"])
        for version in versions:
            lane = broker.lanes.get(version)
            queue.add_metric([version], lane.queued if lane is not None else 0)
            mine = [w for w in supervisor.workers if w.version == version]
            inflight.add_metric([version], sum(w.inflight for w in mine))
            for state in WORKER_STATES:
                workers.add_metric([version, state], sum(w.state == state for w in mine))
            rss.add_metric([version], sum(w.rss_bytes for w in mine))
            gpu.add_metric([version], sum(w.gpu_memory_bytes for w in mine))
            beats = [w.batching.busy_percent for w in mine if w.batching is not None]
            if beats:
                busy.add_metric([version], sum(beats) / len(beats) / 100)
        restarts = CounterMetricFamily("zeropool_worker_restarts",
                                       "Workers that died or failed and were replaced.",
                                       labels=["version"])
        for version, n in sorted(supervisor.restarts_total.items()):
            if self._exported(version, now):
                restarts.add_metric([version], n)
        return [up, uptime, active, queue, inflight, workers, rss, gpu, busy, restarts,
                self._batch_family()]

    def _batch_family(self) -> Metric:
        family = HistogramMetricFamily("zeropool_batch_size",
                                       "Pairs or texts per forward pass.", labels=["version"])
        bounds = [str(float(b)) for b in BATCH_SIZE_BUCKETS] + ["+Inf"]
        for version, (counts, items) in sorted(self.batches.totals().items()):
            family.add_metric([version], _cumulative(bounds, counts), sum_value=items)
        return family

    @staticmethod
    def _system_families(system: dict) -> list[Metric]:
        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], value)
            return family

        out: list[Metric] = [
            gauge("zeropool_system_cpu_percent", "Machine CPU use.", system["cpu_percent"]),
            gauge("zeropool_cpus_usable", "CPUs this pool may use: its affinity, within its "
                  "cgroup's CPU limit.", system["cpus_usable"]),
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
            if g["load_percent"] is not None:  # None: this GPU does not report it (MIG)
                load.add_metric([index], g["load_percent"])
            used.add_metric([index], g["memory_used_bytes"])
            total.add_metric([index], g["memory_total_bytes"])
        return [*out, load, used, total]


def _labels(version: str, op: bytes) -> list[str]:
    return [version or NO_LABEL, op.decode(errors="replace") or NO_LABEL]


def _cumulative(bounds: list[str], counts: list[int]) -> list[tuple[str, float]]:
    out, running = [], 0
    for bound, n in zip(bounds, counts, strict=True):
        running += n
        out.append((bound, running))
    return out


def bucket_quantile(q: float, bounds: tuple[float, ...], counts: list[int]) -> float:
    """The q-quantile of observations counted in buckets (upper bounds `bounds`, plus +Inf),
    interpolated linearly inside its bucket; the +Inf bucket answers the largest bound."""
    rank = q * sum(counts)
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / n
        seen += n
    return bounds[-1]
