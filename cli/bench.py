"""`pool bench`'s display: the live progress line, the report's tables, the spinners. The
run itself (load, rotation watch, report, plot) is tooling.bench."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table

from cli.common import plural
from tooling.bench import BenchPlan, BenchResult, Watch
from tooling.bench import run_bench as run_engine
from tooling.loadgen import LoadSpec

RECENT_WINDOW = 2000  # latencies kept for the live p99


class LiveLine:
    """One line, redrawn four times a second: requests, rate, recent p99, errors, the watch."""

    def __init__(self, console: Console, watch: Watch | None) -> None:
        self.console = console
        self.watch = watch
        self.done = self.errors = 0
        self.recent: list[float] = []
        self.elapsed = 0.0  # the load's own clock, from its ticks: not the producers' start
        self.live = Live(console=console, refresh_per_second=4, transient=True)

    def progress(self, done: int, errors: int, recent: list[float]) -> None:
        self.done, self.errors = done, errors
        self.recent = (self.recent + recent)[-RECENT_WINDOW:]
        self._render()

    def tick(self, elapsed: float) -> None:
        self.elapsed = elapsed
        self._render()  # the engine ticks the watch itself; this only shows its label

    def __enter__(self) -> LiveLine:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(*exc)

    def _render(self) -> None:
        elapsed = self.elapsed
        p99 = np.percentile(self.recent, 99) * 1000 if self.recent else float("nan")
        line = (f"{elapsed:6.1f}s  {self.done:8d} requests  {self.done / max(elapsed, 1e-9):8.1f}"
                f" req/s  p99 {p99:7.1f} ms  errors {self.errors}")
        if self.watch is not None:
            line += f"  | {self.watch.label}"
        self.live.update(line)


def print_report(console: Console, report: dict[str, Any]) -> None:
    errors = sum(report["errors"].values())
    head = Table(title="zeropool bench", show_header=False)
    head.add_row("requests", f"{report['requests']:,} sent, {report['ok']:,} ok, "
                 f"{errors:,} errors, {report['lost']:,} lost")
    head.add_row("producers", f"{report['producers']} processes, "
                 + ("failover client" if report["client"] == "failover" else "raw DEALER"))
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
    usage = report.get("usage")
    if usage:
        cpu = usage["cpu_percent"]
        line = (f"CPU over the load (100% = one core of {usage['cores']}): router "
                f"{cpu['router']:.0f}%, workers {cpu['workers']:.0f}% "
                f"({len(usage['per_worker_cpu_percent'])}), producers {cpu['producers']:.0f}% "
                f"({report['producers']})")
        gpus = usage.get("gpu_busy_percent", {})
        if gpus:
            line += "; GPU busy " + ", ".join(f"{i}: {v:.0f}%" for i, v in gpus.items())
        console.print(line)
        busy = usage.get("device_busy_percent", {})
        stages = usage.get("request_ms")
        if busy and stages:
            console.print(
                "workers' device threads busy " + ", ".join(f"{v:.0f}%" for v in busy.values())
                + f"; a request's mean ms: to the worker {stages['to_worker']:.2f}, queued in "
                f"it {stages['queued_in_worker']:.2f}, in its pass {stages['in_pass']:.2f}")
    echo = report.get("echo")
    if echo:
        low = echo["low_load_p50_ms"]
        console.print(f"transport: zmq.proxy with echo workers {echo['proxy_requests_per_s']:,} "
                      f"req/s; the pool's router is at [bold]{echo['pool_vs_proxy']:.0%}[/] of "
                      f"it; at one request in flight p50 {low['pool']:.3f} ms vs "
                      f"{low['proxy']:.3f} ms (adds {low['added']:.3f} ms)")
    base = report.get("baseline")
    if base:
        threads = plural(base["threads"], "torch thread")
        if base.get("tokenizer_threads"):
            threads += ", " + plural(base["tokenizer_threads"], "tokenizer thread")
        console.print(f"baseline ({threads}, {base['device']}, "
                      f"{base['dtype']}): seed {base['seed_pairs_per_s']} "
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
    table = Table("phase", "requests", "errors", "lost", "p50 ms", "p99 ms", "max ms",
                  title=title)
    for name, ph in rotation["phases"].items():
        lat = ph["latency_ms"]
        fmt = [f"{lat[k]:.1f}" if lat[k] is not None else "-" for k in ("p50", "p99", "max")]
        table.add_row(name, f"{ph['requests']:,}", str(ph["errors"]), str(ph["lost"]), *fmt)
    console.print(table)
    if rec.get("timings"):
        console.print("phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in rec["timings"].items()))
    names = {"rss": "pool RSS", "gpu": "GPU memory"}
    changes = [f"{names[kind]} {m['before_mib']:,.0f} -> {m['after_mib']:,.0f} MiB "
               f"({m['ratio']}x)" for kind, m in rotation.get("memory", {}).items()]
    if changes:
        console.print("memory before the rotation -> after it: " + "; ".join(changes))


def run_bench(spec: LoadSpec, *, spawn: bool, path: str | None, workers: int,
              state_dir: Path | None, rotate_at: float | None, rotate_to: str | None,
              rotate_path: str | None, as_json: bool, console: Console,
              baseline_s: float | None = None, threads: int | None = None,
              rotate_strategy: str = "auto", model: str = "transformer",
              rotate_every: float | None = None, dtype: str | None = None,
              graph: str | None = None, cpu_affinity: str | None = None) -> BenchResult:
    """Run the bench with its progress on `console` and print the report (unless as_json);
    the result, whose files `save_outputs` writes once the report is out."""
    plan = BenchPlan(spawn=spawn, path=path, workers=workers, state_dir=state_dir,
                     rotate_at=rotate_at, rotate_to=rotate_to, rotate_path=rotate_path,
                     rotate_strategy=rotate_strategy, rotate_every=rotate_every, model=model,
                     dtype=dtype, graph=graph, cpu_affinity=cpu_affinity,
                     baseline_s=baseline_s, threads=threads)
    result = run_engine(spec, plan, lambda watch: LiveLine(console, watch), console.status)
    if not as_json:
        print_report(console, result.report)
    return result


def save_outputs(result: BenchResult, json_file: Path | None, plot_file: Path | None,
                 console: Console, as_json: bool) -> None:
    """The report as JSON and the plot where asked for; OSError if one cannot be written."""
    result.save(json_file, plot_file)
    if plot_file is not None and not as_json:
        console.print(f"plot saved to {plot_file}")
