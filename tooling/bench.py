"""`pool bench`'s engine: drive a pool with tooling.loadgen, start and follow a rotation (or
a soak of them) meanwhile, and make the report and the plot. Nothing here prints: cli.bench
shows the progress and the report, and hands in how to display a long step (`Stage`) and a
running load (`LoadDisplay`).
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

from pool.control import ControlError, control_request
from router.client import Client
from router.protocol import OK_CODE
from tooling.launch import PrivatePool
from tooling.loadgen import (
    LoadSpec,
    ProxyBaseline,
    Samples,
    latency_summary,
    make_texts,
    producer_count,
    run_load,
)
from tooling.usage import UsageMeter

ROTATION_POLL_S = 0.25
# The pool refreshes its GPU figures every second (pool.server): read memory after a rotation
# once a fresh figure is sure to have replaced the one taken while the old workers lived.
MEMORY_SETTLE_S = 2.5
LOW_LOAD_S = 3.0  # the one-request-in-flight comparison with zmq.proxy

# A long step of the run, named for whoever displays it (cli.bench: a spinner).
Stage = Callable[[str], AbstractContextManager[object]]


def no_stage(_: str) -> AbstractContextManager[object]:
    return nullcontext()


class LoadDisplay(Protocol):
    """What shows a load while it runs (cli.bench.LiveLine): entered for the run's length,
    fed every progress report and tick. The engine drives the watches, not the display."""

    def __enter__(self) -> object: ...

    def __exit__(self, *exc: object) -> object: ...

    def progress(self, done: int, errors: int, recent: list[float]) -> None: ...

    def tick(self, elapsed: float) -> None: ...


@dataclass
class RotationWatch:
    """Starts a rotation at `at` seconds into the run and follows it to its outcome."""

    state_dir: Path
    at: float
    target: str
    path: str | None
    strategy: str = "auto"
    started: float | None = None  # monotonic
    finished: float | None = None
    record: dict = field(default_factory=dict)
    error: str | None = None
    # The pool's memory right before the rotation and MEMORY_SETTLE_S after it ended (the old
    # workers are reaped by then).
    memory_before: PoolMemory | None = None
    memory_after: PoolMemory | None = None
    _next_poll: float = 0.0

    def tick(self, elapsed: float) -> None:
        now = time.monotonic()
        try:
            if self.started is None and elapsed >= self.at:
                self.memory_before = pool_memory(self.state_dir)
                self.started = now
                reply = control_request(self.state_dir, "rotate", version=self.target,
                                        path=self.path, strategy=self.strategy)
                self.record = reply["rotation"]
            elif self.started is not None and self.finished is None and now >= self._next_poll:
                self._next_poll = now + ROTATION_POLL_S
                self.record = control_request(self.state_dir, "rotation")["rotation"]
                if self.record.get("outcome") is not None:
                    self.finished = now
            elif self.finished is not None and self.memory_after is None \
                    and now >= self.finished + MEMORY_SETTLE_S:
                self.memory_after = pool_memory(self.state_dir)
        except ControlError as exc:
            self.error, self.finished = str(exc), self.finished or now

    def settle(self) -> None:
        """Wait out the rotation, then its memory reading (the load may end first)."""
        while self.started is not None and self.memory_after is None and self.error is None:
            self.tick(float("inf"))
            time.sleep(ROTATION_POLL_S)

    @property
    def label(self) -> str:
        if self.error:
            return f"rotation refused: {self.error}"
        if not self.record:
            return f"rotation to {self.target} at {self.at:.0f}s"
        return f"rotation {self.record['phase']}"


@dataclass
class SoakWatch:
    """Rotates back and forth every `every` seconds and samples the pool's memory."""

    state_dir: Path
    every: float
    paths: dict[str, str]  # the two versions and their model directories
    strategy: str = "auto"
    records: list[dict] = field(default_factory=list)
    memory: list[tuple[float, PoolMemory]] = field(default_factory=list)  # (monotonic, ...)
    error: str | None = None
    _current: int | None = None  # id of the rotation in progress
    _next_at: float = 0.0
    _next_sample: float = 0.0

    def __post_init__(self) -> None:
        self._next_at = self.every  # a steady first stretch to compare the end against

    def tick(self, elapsed: float) -> None:
        now = time.monotonic()
        if now >= self._next_sample and self._current is None:
            # Between rotations only: during a surge both versions are resident by design.
            self._next_sample = now + 1.0
            self.memory.append((now, pool_memory(self.state_dir)))
        if self.error:
            return
        try:
            if self._current is None and elapsed >= self._next_at:
                active = control_request(self.state_dir, "status")["active"]
                target = next(v for v in self.paths if v != active)
                reply = control_request(self.state_dir, "rotate", version=target,
                                        path=self.paths[target], strategy=self.strategy)
                self._current = reply["rotation"]["id"]
            elif self._current is not None:
                record = control_request(self.state_dir, "rotation")["rotation"]
                if record["outcome"] is not None:
                    self.records.append(record)
                    self._current = None
                    self._next_at = elapsed + self.every
        except ControlError as exc:
            self.error = str(exc)

    @property
    def label(self) -> str:
        done = sum(1 for r in self.records if r["outcome"] == "done")
        return f"{done} rotations done" + (f", stopped: {self.error}" if self.error else "")


@dataclass(frozen=True)
class PoolMemory:
    rss: int  # bytes resident in the serve process and everything it started
    gpu: int  # bytes used on the machine's GPUs (NVML, as `pool status` reads it); 0: none


def pool_memory(state_dir: Path) -> PoolMemory:
    import psutil

    try:
        status = control_request(state_dir, "status")
        server = psutil.Process(status["pid"])
        procs = [server, *server.children(recursive=True)]
    except (ControlError, psutil.Error):
        return PoolMemory(0, 0)
    rss = 0
    for proc in procs:
        try:
            rss += proc.memory_info().rss
        except psutil.Error:
            pass  # exited between the listing and the reading
    gpus = (status.get("system") or {}).get("gpus") or []
    return PoolMemory(rss, sum(g["memory_used_bytes"] for g in gpus))


def memory_change(before: PoolMemory | None, after: PoolMemory | None) -> dict[str, Any]:
    """MiB before and after, and after / before, for RSS and (when there is one) GPU."""
    out: dict[str, Any] = {}
    if before is None or after is None:
        return out
    for kind in ("rss", "gpu"):
        was, now = getattr(before, kind), getattr(after, kind)
        if was:
            out[kind] = {"before_mib": round(was / 2**20, 1), "after_mib": round(now / 2**20, 1),
                         "ratio": round(now / was, 3)}
    return out


def soak_report(samples: Samples, soak: SoakWatch, started: float) -> dict[str, Any]:
    """First and last tenth of the run side by side: latency and the pool's memory."""
    end = float(samples.sent.max()) if samples.sent.size else started
    tenth = (end - started) / 10
    windows = {"first_tenth": (started, started + tenth), "last_tenth": (end - tenth, end)}
    out: dict[str, Any] = {
        "rotations": len(soak.records),
        "outcomes": {o: sum(1 for r in soak.records if r["outcome"] == o)
                     for o in sorted({r["outcome"] for r in soak.records})},
        "error": soak.error,
    }
    ok = np.array(samples.outcome) == OK_CODE
    for name, (lo, hi) in windows.items():
        mask = (samples.sent >= lo) & (samples.sent < hi)
        # Readings are taken between rotations; a window spent inside one uses the last before.
        readings = [m for t, m in soak.memory if lo <= t <= hi and m.rss] or [
            m for t, m in soak.memory if t <= hi and m.rss][-1:]
        out[name] = {"latency_ms": latency_summary(samples.latency[mask & ok]),
                     "rss_mib": _mean_mib([m.rss for m in readings]),
                     "gpu_mib": _mean_mib([m.gpu for m in readings if m.gpu])}
    first, last = out["first_tenth"], out["last_tenth"]
    if first["latency_ms"]["p50"] and last["latency_ms"]["p50"]:
        out["p50_drift"] = round(last["latency_ms"]["p50"] / first["latency_ms"]["p50"], 3)
    for kind in ("rss", "gpu"):
        if first[f"{kind}_mib"] and last[f"{kind}_mib"]:
            out[f"{kind}_drift"] = round(last[f"{kind}_mib"] / first[f"{kind}_mib"], 3)
    return out


def _mean_mib(values: list[int]) -> float | None:
    return round(sum(values) / len(values) / 2**20, 1) if values else None


def build_report(spec: LoadSpec, samples: Samples, watch: RotationWatch | None,
                 started: float) -> dict[str, Any]:
    outcomes = np.array(samples.outcome)
    answered = ~np.isnan(samples.latency)
    end = float(np.nanmax(samples.sent + np.nan_to_num(samples.latency))) if len(outcomes) \
        else started
    seconds = max(end - started, 1e-9)
    ok = int((outcomes == OK_CODE).sum())
    codes, counts = np.unique(outcomes[(outcomes != OK_CODE) & answered], return_counts=True)
    report: dict[str, Any] = {
        "endpoint": spec.endpoint, "concurrency": spec.concurrency,
        # The processes that ran: never more than requests in flight (tooling.loadgen).
        "producers": producer_count(spec), "client": "failover" if spec.failover else "dealer",
        "pairs_per_request": spec.pairs_per_request,
        "text_chars": spec.text_chars, "version": spec.version or None,
        "requests": len(outcomes), "ok": ok,
        "errors": {str(c): int(n) for c, n in zip(codes, counts, strict=True)},
        "lost": int((~answered).sum()), "seconds": round(seconds, 3),
        "requests_per_s": round(ok / seconds, 1),
        "pairs_per_s": round(ok * spec.pairs_per_request / seconds, 1),
        # Over the requests answered ok, as throughput counts them: an error is often a
        # refusal at the door (overloaded: 0.2 ms), which would make a saturated pool's
        # latencies look good.
        "latency_ms": latency_summary(samples.latency[outcomes == OK_CODE]),
        "versions": {v: samples.version.count(v) for v in sorted(set(samples.version)) if v},
    }
    if watch is not None and watch.started is not None:
        stop = watch.finished or end
        phases = {"before": samples.sent < watch.started,
                  "during": (samples.sent >= watch.started) & (samples.sent < stop),
                  "after": samples.sent >= stop}
        report["rotation"] = {
            "record": watch.record, "error": watch.error,
            "started_s": round(watch.started - started, 3),
            "finished_s": round(stop - started, 3),
            "memory": memory_change(watch.memory_before, watch.memory_after),
            # As the headline counts them: errors are answers, lost requests got none.
            "phases": {name: {"requests": int(mask.sum()),
                              "errors": int(((outcomes != OK_CODE) & answered & mask).sum()),
                              "lost": int((~answered & mask).sum()),
                              "latency_ms": latency_summary(
                                  samples.latency[mask & (outcomes == OK_CODE)])}
                       for name, mask in phases.items()},
        }
    return report


def plot_report(samples: Samples, report: dict[str, Any], started: float, file: Path) -> None:
    """Throughput and latency percentiles per second, the rotation window shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = samples.sent - started
    answered = ~np.isnan(samples.latency)
    bins = np.arange(0, max(1.0, float(t.max()) + 1) if t.size else 1.0, 1.0)
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    counts, _ = np.histogram(t[answered], bins=bins)
    ax1.plot(bins[:-1], counts, drawstyle="steps-post", label="replies/s")
    # dtype: an empty run's np.array([]) is float, which `&` with a bool mask refuses.
    errors = np.array([o != OK_CODE for o in samples.outcome], dtype=bool) & answered
    if errors.any():
        ax1.plot(bins[:-1], np.histogram(t[errors], bins=bins)[0], "r", drawstyle="steps-post",
                 label="errors/s")
    ax1.set_ylabel("requests / s")
    ax1.legend(loc="lower left")
    idx = np.digitize(t, bins) - 1
    for q, style in ((50, "-"), (99, "--")):
        series = [np.percentile(samples.latency[(idx == i) & answered], q) * 1000
                  if ((idx == i) & answered).any() else np.nan for i in range(len(bins) - 1)]
        ax2.plot(bins[:-1], series, style, label=f"p{q}")
    ax2.set_ylabel("latency (ms)")
    ax2.set_xlabel("seconds")
    ax2.legend(loc="upper left")
    rotation = report.get("rotation")
    if rotation:
        for ax in (ax1, ax2):
            ax.axvspan(rotation["started_s"], rotation["finished_s"], color="orange", alpha=0.2,
                       label="rotation")
        ax1.set_title(f"rotation {rotation['record'].get('source')} -> "
                      f"{rotation['record'].get('target')} shaded")
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)


def run_baseline(spec: LoadSpec, report: dict[str, Any], path: str, threads: int,
                 seconds: float, runtime: PoolRuntime | None = None,
                 stage: Stage = no_stage) -> dict[str, Any]:
    """The seed's loop (its own dtype) and an in-process batched loop (the pool's), same
    model, device, torch threads and tokenizer threads."""
    # Imported here: the baselines bring torch and transformers, which a run without them
    # (or an echo pool) need not load.
    from tooling.baseline import batched_pairs_per_s, seed_pairs_per_s, tokenizer_threads

    runtime = runtime or PoolRuntime()
    device, dtype = runtime.device, runtime.dtype
    texts = make_texts(8192, spec.text_chars, random.Random(spec.seed + 7))
    pairs = list(zip(texts[0::2], texts[1::2], strict=True))
    where = f"{threads} threads, {device}"
    with tokenizer_threads(runtime.tokenizer_threads):
        with stage(f"baseline: the seed's one-pair loop, {where}, {seconds}s"):
            seed = seed_pairs_per_s(path, threads, seconds, pairs, device)
        with stage(f"baseline: an in-process batched loop, {where}, {seconds}s"):
            batched = batched_pairs_per_s(path, threads, seconds, pairs, device=device,
                                          dtype=dtype)
    pool = report["pairs_per_s"]
    return {"threads": threads, "tokenizer_threads": runtime.tokenizer_threads,
            "device": device, "dtype": dtype, "seconds": seconds,
            "seed_pairs_per_s": round(seed, 1),
            "batched_pairs_per_s": round(batched, 1), "pool_pairs_per_s": pool,
            "pool_vs_seed": round(pool / seed, 2), "pool_vs_batched": round(pool / batched, 2)}



def compare_with_proxy(spec: LoadSpec, workers: int, directory: Path, report: dict[str, Any],
                       stage: Stage = no_stage) -> dict[str, Any]:
    """The same load through libzmq's zmq.proxy with echo workers: the transport's limit."""
    proxy = ProxyBaseline(str(directory), workers)
    try:
        with stage("the same load through zmq.proxy..."):
            proxy_spec = replace(spec, endpoint=proxy.endpoint)
            proxy_samples = run_load(proxy_spec, _quiet)
            proxied = build_report(proxy_spec, proxy_samples, None, proxy_samples.started)
        with stage(f"one request in flight for {LOW_LOAD_S:.0f}s, pool then proxy..."):
            low = replace(spec, concurrency=1, producers=1, duration_s=LOW_LOAD_S, requests=None)
            pool_low = latency_summary(run_load(low, _quiet).latency)["p50"] or 0.0
            proxy_low = latency_summary(run_load(replace(low, endpoint=proxy.endpoint), _quiet)
                                        .latency)["p50"] or 0.0
    finally:
        proxy.close()
    return {"proxy_requests_per_s": proxied["requests_per_s"],
            "pool_vs_proxy": round(report["requests_per_s"] / proxied["requests_per_s"], 3),
            "low_load_p50_ms": {"pool": round(pool_low, 3), "proxy": round(proxy_low, 3),
                                "added": round(pool_low - proxy_low, 3)}}


def _quiet(*_: object) -> None:
    pass


def active_model_path(state_dir: Path) -> str:
    status = control_request(state_dir, "status")
    return status["versions"][status["active"]]["path"]


@dataclass(frozen=True)
class PoolRuntime:
    """Where and in what the active version's workers compute, and the threads tokenising
    for each: the baselines run the same."""

    device: str = "cpu"  # or "cuda:N"
    dtype: str = "auto"
    tokenizer_threads: int = 0  # 0: unknown, the tokenizer library's own default


def pool_runtime(state_dir: Path | None) -> PoolRuntime:
    if state_dir is None:
        return PoolRuntime()
    status = control_request(state_dir, "status")
    workers = [w for w in status["workers"] if w["version"] == status["active"]]
    threads = int(status["settings"].get("tokenizer_threads") or 0)
    if not workers:
        return PoolRuntime(tokenizer_threads=threads)
    return PoolRuntime(workers[0]["device"], workers[0]["dtype"] or "auto", threads)


@dataclass(frozen=True)
class BenchPlan:
    """Everything of a `pool bench` run besides the load itself (LoadSpec)."""

    spawn: bool = False  # start a private pool (stopped after) rather than use a running one
    path: str | None = None  # with spawn: the model directory (default: embedded)
    workers: int = 2
    state_dir: Path | None = None  # the running pool's, for the control requests
    rotate_at: float | None = None
    rotate_to: str | None = None
    rotate_path: str | None = None
    rotate_strategy: str = "auto"
    rotate_every: float | None = None  # soak: rotate back and forth this often
    model: str = "transformer"  # with spawn: or "echo", compared with zmq.proxy
    dtype: str | None = None  # with spawn: the workers' --dtype (None: the pool's default)
    graph: str | None = None  # with spawn: the workers' --graph (None: the pool's default)
    cpu_affinity: str | None = None  # with spawn: the pool's --cpu-affinity (None: its default)
    baseline_s: float | None = None  # measure the baselines this long (None: not at all)
    # Torch threads of a spawned pool's workers (None: the pool's default) and of the
    # baselines (None: every core): give it to compare on the same thread budget.
    threads: int | None = None


@dataclass
class BenchResult:
    report: dict[str, Any]
    samples: Samples
    started: float  # monotonic, the load's start: the report's and the plot's time zero

    def save(self, json_file: Path | None, plot_file: Path | None) -> None:
        """The report as JSON and the plot, where asked for."""
        if json_file is not None:
            json_file.write_bytes(orjson.dumps(self.report, option=orjson.OPT_INDENT_2))
        if plot_file is not None:
            plot_report(self.samples, self.report, self.started, plot_file)


Watch = RotationWatch | SoakWatch


def make_watch(plan: BenchPlan, state_dir: Path | None) -> Watch | None:
    """The rotation (--rotate-at) or the soak (--rotate-every) to run beside the load."""
    if plan.rotate_at is not None and plan.rotate_to:
        assert state_dir is not None
        return RotationWatch(Path(state_dir), plan.rotate_at, plan.rotate_to, plan.rotate_path,
                             plan.rotate_strategy)
    if plan.rotate_every is None:
        return None
    assert state_dir is not None
    status = control_request(Path(state_dir), "status")
    first = status["active"]
    other = plan.rotate_to or ("v2" if first != "v2" else "v1")
    paths = {first: status["versions"][first]["path"],
             other: plan.rotate_path or status["versions"][first]["path"]}
    return SoakWatch(Path(state_dir), plan.rotate_every, paths, plan.rotate_strategy)


def run_bench(spec: LoadSpec, plan: BenchPlan,
              display: Callable[[Watch | None], LoadDisplay],
              stage: Stage = no_stage) -> BenchResult:
    """Run the load (on a private pool with plan.spawn), the watch beside it, the
    comparisons asked for; the report. A private pool is stopped before this returns."""
    pool: PrivatePool | None = None
    state_dir = plan.state_dir
    try:
        if plan.spawn:
            extra = ("--model", plan.model, *(("--dtype", plan.dtype) if plan.dtype else ()),
                     *(("--graph", plan.graph) if plan.graph else ()),
                     *(("--cpu-affinity", plan.cpu_affinity) if plan.cpu_affinity else ()),
                     *(("--threads", str(plan.threads)) if plan.threads else ()))
            pool = PrivatePool(plan.workers, plan.path, extra,
                               prefix="zp-bench-")
            state_dir = pool.state_dir
            with stage(f"starting a pool of {plan.workers} workers..."):
                pool.wait_ready()
            spec = replace(spec, endpoint=pool.endpoint)
            if plan.rotate_to and not plan.rotate_path:
                # Rotate to the same weights under another name: a rotation all the same.
                plan = replace(plan, rotate_path=active_model_path(pool.state_dir))
        check_reachable(spec)
        watch = make_watch(plan, state_dir)
        samples, usage = _run_watched(spec, watch, display(watch), state_dir)
        started = samples.started
        rotation = watch if isinstance(watch, RotationWatch) else None
        report = build_report(spec, samples, rotation, started)
        if usage is not None:
            report["usage"] = usage.report(samples.cpu_s)
        if isinstance(watch, SoakWatch):
            report["soak"] = soak_report(samples, watch, started)
        if plan.model == "echo":
            directory = pool.state_dir if pool else Path(tempfile.gettempdir())
            report["echo"] = compare_with_proxy(spec, plan.workers, directory, report, stage)
        if plan.baseline_s:
            model_path = plan.path or active_model_path(Path(state_dir or ""))
            threads = plan.threads or os.cpu_count() or 1
            report["baseline"] = run_baseline(spec, report, model_path, threads,
                                              plan.baseline_s, pool_runtime(state_dir),
                                              stage=stage)
        return BenchResult(report, samples, started)
    finally:
        if pool is not None:
            pool.close()


def run_failures(report: dict[str, Any], rotation_asked: bool) -> list[str]:
    """What went wrong with a run besides failed requests (those the report counts): no
    request answered, or a rotation asked for (--rotate-at, --rotate-every) that was
    refused, rolled back or never started. Each says why, for stderr and the exit code."""
    failures = []
    if report["requests"] == 0:
        failures.append(f"no request was sent in {report['seconds']:.1f}s")
    elif report["lost"] == report["requests"]:
        failures.append(f"none of the {report['requests']:,} requests sent was answered")
    if rotation_asked:
        failures += _rotation_failures(report)
    return failures


def _rotation_failures(report: dict[str, Any]) -> list[str]:
    soak = report.get("soak")
    if soak is not None:
        failed = {o: n for o, n in soak["outcomes"].items() if o != "done"}
        return ([f"the soak stopped: {soak['error']}"] if soak["error"] else []) + (
            [f"soak rotations that did not end done: {failed}"] if failed else [])
    rotation = report.get("rotation")
    if rotation is None:
        return [f"the load ended ({report['seconds']:.1f}s) before the rotation was due: "
                "none happened"]
    record = rotation["record"]
    if rotation["error"]:
        return [f"the rotation failed: {rotation['error']}"]
    if record.get("outcome") != "done":
        return [f"the rotation to {record.get('target')} ended {record.get('outcome')}"
                + (f": {record['reason']}" if record.get("reason") else "")]
    return []


PREFLIGHT_TIMEOUT_S = 10.0


def check_reachable(spec: LoadSpec) -> None:
    """One ping with the load's keys before the producers start: a pool that refuses them
    (AuthenticationFailed) or is not there (NoReply) is said at once, not as a run of lost
    requests."""
    with Client(spec.endpoint, timeout=PREFLIGHT_TIMEOUT_S, curve=spec.curve) as client:
        client.ping(version=spec.version or None)


def _run_watched(spec: LoadSpec, watch: Watch | None, display: LoadDisplay,
                 state_dir: Path | None = None) -> tuple[Samples, UsageMeter | None]:
    """The load with `watch` and a usage meter on the pool of `state_dir` ticked beside it,
    then a rotation waited out; (samples, the meter)."""
    meter: UsageMeter | None = None

    def start(_: float) -> None:
        # Metered from the load's start, as --rotate-at counts (the ticks' elapsed): not
        # over the producers' own start, while the pool idled.
        nonlocal meter
        meter = UsageMeter.start(state_dir)

    def tick(elapsed: float) -> None:
        if watch is not None:
            watch.tick(elapsed)
        if meter is not None:
            meter.tick()
        display.tick(elapsed)

    with display:
        samples = run_load(spec, display.progress, tick, start)
        if isinstance(watch, RotationWatch):
            watch.settle()
    return samples, meter
