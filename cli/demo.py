"""`pool demo`: the whole story in about a minute.

Start a pool on English MiniLM (v1), score Chinese and English sample pairs, bench it for
DEMO_SECONDS with a rotation to the multilingual model (v2) at ROTATE_AT_S, score the pairs
again, print both versions' scores side by side, the report and its headline, save the
plot, stop cleanly. The steps are tooling.demo's; this module shows them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.bench import run_bench, save_outputs
from cli.ops import quality_line
from tooling.bench import run_failures
from tooling.demo import (
    DEMO_IN_FLIGHT,
    DEMO_SECONDS,
    ROTATE_AT_S,
    ROTATE_TO,
    Demo,
    Scored,
    exit_code,
    failures,
)


def run_demo(workers: int, paths: tuple[str, str], names: tuple[str, str], plot: Path,
             as_json: bool) -> int:
    """`paths`: v1's and v2's model directories; `names`: how to call them."""
    console = Console(stderr=as_json)
    demo = Demo(workers, paths[0])
    report: dict[str, Any] = {}
    try:
        with console.status(f"starting a pool of {workers} workers on {names[0]} (v1)..."):
            report["ready_seconds"] = demo.wait_ready()
        console.print(f"pool ready in {report['ready_seconds']}s at {demo.endpoint}")
        before = demo.score()
        console.print(f"\n{DEMO_SECONDS:.0f}s of load ({DEMO_IN_FLIGHT} requests in flight from "
                      f"2 producer processes), rotating v1 -> {ROTATE_TO} ({names[1]}) at "
                      f"{ROTATE_AT_S:.0f}s:")
        result = run_bench(
            demo.bench_spec(), spawn=False, path=None, workers=workers,
            state_dir=demo.pool.state_dir, rotate_at=ROTATE_AT_S, rotate_to=ROTATE_TO,
            rotate_path=paths[1], as_json=as_json, console=console)
        report["bench"] = result.report
        save_outputs(result, None, plot, console, as_json)
        console.print(headline(report["bench"]))
        for failure in run_failures(report["bench"], rotation_asked=True):
            console.print(f"[bold red]error[/]: {escape(failure)}")
        after = demo.score()
        report["pairs"] = {scored.version: scored.rows for scored in (before, after)}
        print_scores(before, after, names, console)
    finally:
        report["exit_code"] = demo.close()
    console.print(f"pool stopped (exit code {report['exit_code']})")
    if as_json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return exit_code(report)


def print_scores(before: Scored, after: Scored, names: tuple[str, str],
                 console: Console) -> None:
    """The pairs as each version scored them, side by side, each with its own verdicts."""
    table = Table("text a", "text b", "expected", before.version, after.version,
                  title="Chinese pairs, by version",
                  caption=f"{before.version}: {names[0]}, {after.version}: {names[1]}; each "
                          "version's verdicts by its own thresholds")
    for old, new in zip(before.rows, after.rows, strict=True):
        table.add_row(old["a"], old["b"], old["expected"], verdict_cell(old),
                      verdict_cell(new))
    console.print(table)


def verdict_cell(row: dict[str, Any]) -> str:
    """Score and verdict, green where the verdict is the one expected."""
    style = "green" if row["verdict"] == row["expected"] else "red"
    return f"{row['score']:.3f} [{style}]{row['verdict']}[/]"


def headline(bench: dict[str, Any]) -> str:
    failed = failures(bench)
    color = "green" if failed == 0 else "red"
    line = (f"\n[bold]{bench['ok']:,} requests served, [{color}]{failed} failed[/][/] "
            f"({bench['requests_per_s']} req/s)")
    rotation = bench.get("rotation")
    if rotation:
        p99 = {k: v["latency_ms"]["p99"] for k, v in rotation["phases"].items()}
        line += ("; p99 " + " / ".join(f"{k} {v:.0f} ms" for k, v in p99.items() if v)
                 + f"; rotation {rotation['record'].get('outcome')} in "
                 f"{rotation['finished_s'] - rotation['started_s']:.1f}s")
        if rotation["record"].get("quality"):
            line += "\n" + quality_line(rotation["record"]["quality"])
    return line
