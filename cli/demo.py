"""`pool demo`: the whole story on the embedded model in under two minutes.

Start a pool, score sample pairs with the seed's verdicts, bench it for DEMO_SECONDS with a
rotation to a second version at ROTATE_AT_S, print the report and its headline, save the
plot, stop cleanly. The steps are tooling.demo's; this module shows them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from cli.bench import run_bench
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


def run_demo(workers: int, path: str | None, plot: Path, as_json: bool) -> int:
    console = Console(stderr=as_json)
    demo = Demo(workers, path)
    report: dict[str, Any] = {}
    try:
        with console.status(f"starting a pool of {workers} workers on the embedded model..."):
            report["ready_seconds"] = demo.wait_ready()
        console.print(f"pool ready in {report['ready_seconds']}s at {demo.endpoint}")
        report["pairs"] = print_scores(demo.score(), console)
        model_path = demo.active_model_path()
        console.print(f"\n{DEMO_SECONDS:.0f}s of load ({DEMO_IN_FLIGHT} requests in flight from "
                      f"2 producer processes), rotating v1 -> {ROTATE_TO} at "
                      f"{ROTATE_AT_S:.0f}s:")
        report["bench"] = run_bench(
            demo.bench_spec(), spawn=False, path=None, workers=workers,
            state_dir=demo.pool.state_dir, rotate_at=ROTATE_AT_S, rotate_to=ROTATE_TO,
            rotate_path=model_path, json_file=None, plot_file=plot, as_json=as_json,
            console=console)
        console.print(headline(report["bench"]))
    finally:
        report["exit_code"] = demo.close()
    console.print(f"pool stopped (exit code {report['exit_code']})")
    if as_json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return exit_code(report)


def print_scores(scored: Scored, console: Console) -> list[dict[str, Any]]:
    """The scored pairs as a table; the rows, for the JSON report."""
    table = Table("text a", "text b", "score", "verdict", title=f"version {scored.version}")
    for row in scored.rows:
        table.add_row(row["a"], row["b"], f"{row['score']:.4f}", row["verdict"])
    console.print(table)
    return scored.rows


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
    return line
