"""`pool bench`: drive a pool from producer processes, show progress live, report, plot."""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from rich.console import Console
from rich.live import Live
from rich.table import Table

from pool.control import ControlError, control_request
from pool.launch import PrivatePool
from router.bench import (
    OK,
    LoadSpec,
    ProxyBaseline,
    Samples,
    latency_summary,
    make_texts,
    run_load,
)

ROTATION_POLL_S = 0.25
# The pool refreshes its GPU figures every second (pool.server): read memory after a rotation
# once a fresh figure is sure to have replaced the one taken while the old workers lived.
MEMORY_SETTLE_S = 2.5
RECENT_WINDOW = 2000  # latencies kept for the live p99


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
    for name, (lo, hi) in windows.items():
        mask = (samples.sent >= lo) & (samples.sent < hi)
        # Readings are taken between rotations; a window spent inside one uses the last before.
        readings = [m for t, m in soak.memory if lo <= t <= hi and m.rss] or [
            m for t, m in soak.memory if t <= hi and m.rss][-1:]
        out[name] = {"latency_ms": latency_summary(samples.latency[mask]),
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


class LiveLine:
    def __init__(self, console: Console, watch: RotationWatch | SoakWatch | None) -> None:
        self.console = console
        self.watch = watch
        self.done = self.errors = 0
        self.recent: list[float] = []
        self.start = time.monotonic()
        self.live = Live(console=console, refresh_per_second=4, transient=True)

    def progress(self, done: int, errors: int, recent: list[float]) -> None:
        self.done, self.errors = done, errors
        self.recent = (self.recent + recent)[-RECENT_WINDOW:]
        self._render()

    def tick(self, elapsed: float) -> None:
        if self.watch is not None:
            self.watch.tick(elapsed)
        self._render()

    def _render(self) -> None:
        elapsed = time.monotonic() - self.start
        p99 = np.percentile(self.recent, 99) * 1000 if self.recent else float("nan")
        line = (f"{elapsed:6.1f}s  {self.done:8d} requests  {self.done / max(elapsed, 1e-9):8.1f}"
                f" req/s  p99 {p99:7.1f} ms  errors {self.errors}")
        if self.watch is not None:
            line += f"  | {self.watch.label}"
        self.live.update(line)


def build_report(spec: LoadSpec, samples: Samples, watch: RotationWatch | None,
                 started: float) -> dict[str, Any]:
    outcomes = np.array(samples.outcome)
    answered = ~np.isnan(samples.latency)
    end = float(np.nanmax(samples.sent + np.nan_to_num(samples.latency))) if len(outcomes) \
        else started
    seconds = max(end - started, 1e-9)
    ok = int((outcomes == OK).sum())
    codes, counts = np.unique(outcomes[(outcomes != OK) & answered], return_counts=True)
    report: dict[str, Any] = {
        "endpoint": spec.endpoint, "concurrency": spec.concurrency,
        "producers": spec.producers, "pairs_per_request": spec.pairs_per_request,
        "text_chars": spec.text_chars, "version": spec.version or None,
        "requests": len(outcomes), "ok": ok,
        "errors": {str(c): int(n) for c, n in zip(codes, counts, strict=True)},
        "lost": int((~answered).sum()), "seconds": round(seconds, 3),
        "requests_per_s": round(ok / seconds, 1),
        "pairs_per_s": round(ok * spec.pairs_per_request / seconds, 1),
        "latency_ms": latency_summary(samples.latency),
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
            "phases": {name: {"requests": int(mask.sum()),
                              "errors": int(((outcomes != OK) & mask).sum()),
                              "latency_ms": latency_summary(samples.latency[mask])}
                       for name, mask in phases.items()},
        }
    return report


def print_report(console: Console, report: dict[str, Any]) -> None:
    errors = sum(report["errors"].values())
    head = Table(title="zeropool bench", show_header=False)
    head.add_row("requests", f"{report['requests']:,} sent, {report['ok']:,} ok, "
                 f"{errors:,} errors, {report['lost']:,} lost")
    if report["errors"]:
        head.add_row("errors by code", ", ".join(f"{k} {v}" for k, v in report["errors"].items()))
    head.add_row("throughput", f"{report['requests_per_s']:,} req/s, "
                 f"{report['pairs_per_s']:,} pairs/s over {report['seconds']:.1f}s")
    lat = report["latency_ms"]
    if lat["p50"] is not None:
        head.add_row("latency", "  ".join(f"{k} {v:.1f} ms" for k, v in lat.items()))
    head.add_row("versions", ", ".join(f"{k}: {v:,}" for k, v in report["versions"].items()))
    console.print(head)
    soak = report.get("soak")
    if soak:
        gpu = soak["first_tenth"]["gpu_mib"] is not None
        table = Table("window", "p50 ms", "p99 ms", "pool RSS MiB (between rotations)",
                      *(["GPU MiB"] if gpu else []),
                      title=f"soak: {soak['rotations']} rotations {soak['outcomes']}")
        for name in ("first_tenth", "last_tenth"):
            window = soak[name]
            lat = window["latency_ms"]
            table.add_row(name.replace("_", " "), *(f"{lat[k]:.1f}" if lat[k] else "-"
                                                    for k in ("p50", "p99")),
                          *(f"{window[k]:.0f}" if window[k] else "-"
                            for k in (["rss_mib", "gpu_mib"] if gpu else ["rss_mib"])))
        console.print(table)
        console.print(f"drift, last / first tenth: p50 {soak.get('p50_drift')}x, "
                      f"RSS {soak.get('rss_drift')}x"
                      + (f", GPU memory {soak.get('gpu_drift')}x" if gpu else "")
                      + (f"; stopped early: {soak['error']}" if soak["error"] else ""))
    echo = report.get("echo")
    if echo:
        low = echo["low_load_p50_ms"]
        console.print(f"transport: zmq.proxy with echo workers {echo['proxy_requests_per_s']:,} "
                      f"req/s; the pool's router is at [bold]{echo['pool_vs_proxy']:.0%}[/] of "
                      f"it; at one request in flight p50 {low['pool']:.3f} ms vs "
                      f"{low['proxy']:.3f} ms (adds {low['added']:.3f} ms)")
    base = report.get("baseline")
    if base:
        console.print(f"baseline ({base['threads']} threads, {base['device']}): seed "
                      f"{base['seed_pairs_per_s']} "
                      f"pairs/s, batched {base['batched_pairs_per_s']} pairs/s; the pool is "
                      f"[bold]{base['pool_vs_seed']}x[/] the seed, "
                      f"[bold]{base['pool_vs_batched']}x[/] the batched loop")
    rotation = report.get("rotation")
    if not rotation:
        return
    rec = rotation["record"]
    title = (f"rotation {rec.get('source')} -> {rec.get('target')}: {rec.get('outcome')}"
             if rec else "rotation")
    if rotation["error"]:
        title += f" ({rotation['error']})"
    table = Table("phase", "requests", "errors", "p50 ms", "p99 ms", "max ms", title=title)
    for name, ph in rotation["phases"].items():
        lat = ph["latency_ms"]
        fmt = [f"{lat[k]:.1f}" if lat[k] is not None else "-" for k in ("p50", "p99", "max")]
        table.add_row(name, f"{ph['requests']:,}", str(ph["errors"]), *fmt)
    console.print(table)
    if rec.get("timings"):
        console.print("phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in rec["timings"].items()))
    names = {"rss": "pool RSS", "gpu": "GPU memory"}
    changes = [f"{names[kind]} {m['before_mib']:,.0f} -> {m['after_mib']:,.0f} MiB "
               f"({m['ratio']}x)" for kind, m in rotation.get("memory", {}).items()]
    if changes:
        console.print("memory before the rotation -> after it: " + "; ".join(changes))


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
    errors = np.array([o != OK for o in samples.outcome]) & answered
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
                 seconds: float, console: Console, device: str = "cpu") -> dict[str, Any]:
    """The seed's loop and an in-process batched loop, same model, device and threads."""
    from pool.baseline import batched_pairs_per_s, seed_pairs_per_s

    texts = make_texts(8192, spec.text_chars, random.Random(spec.seed + 7))
    pairs = list(zip(texts[0::2], texts[1::2], strict=True))
    where = f"{threads} threads, {device}"
    with console.status(f"baseline: the seed's one-pair loop, {where}, {seconds}s"):
        seed = seed_pairs_per_s(path, threads, seconds, pairs, device)
    with console.status(f"baseline: an in-process batched loop, {where}, {seconds}s"):
        batched = batched_pairs_per_s(path, threads, seconds, pairs, device=device)
    pool = report["pairs_per_s"]
    return {"threads": threads, "device": device, "seconds": seconds,
            "seed_pairs_per_s": round(seed, 1),
            "batched_pairs_per_s": round(batched, 1), "pool_pairs_per_s": pool,
            "pool_vs_seed": round(pool / seed, 2), "pool_vs_batched": round(pool / batched, 2)}


LOW_LOAD_S = 3.0


def compare_with_proxy(spec: LoadSpec, workers: int, directory: Path, report: dict[str, Any],
                       console: Console) -> dict[str, Any]:
    """The same load through libzmq's zmq.proxy with echo workers: the transport's limit."""
    proxy = ProxyBaseline(str(directory), workers)
    try:
        with console.status("the same load through zmq.proxy..."):
            proxy_spec = replace(spec, endpoint=proxy.endpoint)
            started = time.monotonic()
            proxied = build_report(proxy_spec, run_load(proxy_spec, _quiet), None, started)
        with console.status(f"one request in flight for {LOW_LOAD_S:.0f}s, pool then proxy..."):
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


def pool_device(state_dir: Path | None) -> str:
    """Where the active version's workers compute ("cuda:N" or "cpu"): the baselines' too."""
    if state_dir is None:
        return "cpu"
    status = control_request(state_dir, "status")
    devices = [w["device"] for w in status["workers"] if w["version"] == status["active"]]
    return devices[0] if devices else "cpu"


def run_bench(spec: LoadSpec, *, spawn: bool, path: str | None, workers: int,
              state_dir: Path | None, rotate_at: float | None, rotate_to: str | None,
              rotate_path: str | None, json_file: Path | None, plot_file: Path | None,
              as_json: bool, console: Console, baseline_s: float | None = None,
              baseline_threads: int = 1, rotate_strategy: str = "auto",
              model: str = "transformer", rotate_every: float | None = None) -> dict[str, Any]:
    pool: PrivatePool | None = None
    try:
        if spawn:
            pool = PrivatePool(workers, path, ("--model", model), prefix="zp-bench-")
            state_dir = pool.state_dir
            with console.status(f"starting a pool of {workers} workers..."):
                pool.wait_ready()
            spec = replace(spec, endpoint=pool.endpoint)
            if rotate_to and not rotate_path:
                # Rotate to the same weights under another name: a rotation all the same.
                rotate_path = active_model_path(pool.state_dir)
        watch: RotationWatch | None = None
        soak: SoakWatch | None = None
        if rotate_at is not None and rotate_to:
            assert state_dir is not None
            watch = RotationWatch(Path(state_dir), rotate_at, rotate_to, rotate_path,
                                  rotate_strategy)
        elif rotate_every is not None:
            assert state_dir is not None
            status = control_request(Path(state_dir), "status")
            first = status["active"]
            other = rotate_to or ("v2" if first != "v2" else "v1")
            paths = {first: status["versions"][first]["path"],
                     other: rotate_path or status["versions"][first]["path"]}
            soak = SoakWatch(Path(state_dir), rotate_every, paths, rotate_strategy)
        live = LiveLine(console, watch or soak)
        started = time.monotonic()
        with live.live:
            samples = run_load(spec, live.progress, live.tick)
            if watch is not None:
                watch.settle()
        report = build_report(spec, samples, watch, started)
        if soak is not None:
            report["soak"] = soak_report(samples, soak, started)
        if model == "echo":
            report["echo"] = compare_with_proxy(spec, workers, pool.state_dir if pool else Path(
                tempfile.gettempdir()), report, console)
        if baseline_s:
            model = path or active_model_path(Path(state_dir or ""))
            report["baseline"] = run_baseline(spec, report, model, baseline_threads,
                                              baseline_s, console, pool_device(state_dir))
        if not as_json:
            print_report(console, report)
        if json_file is not None:
            json_file.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        if plot_file is not None:
            plot_report(samples, report, started, plot_file)
            if not as_json:
                console.print(f"plot saved to {plot_file}")
        return report
    finally:
        if pool is not None:
            pool.close()
