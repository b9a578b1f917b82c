"""`pool demo`: the whole story on the embedded model in under two minutes.

Start a pool, score sample pairs with the seed's verdicts, bench it for DEMO_SECONDS with a
rotation to a second version at ROTATE_AT_S (it takes ~9 s on 2 cores, leaving time to see
the after), print the report and its headline, save the plot, stop cleanly.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from cli.bench import run_bench
from pool.control import control_request
from pool.launch import PrivatePool
from router.bench import LoadSpec
from router.client import Client, verdict

SAMPLE_PAIRS = [
    ("今天天气真好", "今日阳光明媚"),
    ("我想订一张去北京的机票", "帮我买一张到北京的飞机票"),
    ("这家餐厅的菜很好吃", "股票市场今天大跌"),
    ("The weather is lovely today", "It is sunny and warm outside"),
    ("How do I reset my password?", "I forgot my login credentials"),
    ("The cat sat on the mat", "Quarterly revenue grew by 8%"),
]
DEMO_SECONDS = 25.0
ROTATE_AT_S = 8.0
DEMO_IN_FLIGHT = 64


def run_demo(workers: int, path: str | None, plot: Path, as_json: bool) -> int:
    console = Console(stderr=as_json)
    pool = PrivatePool(workers, path, prefix="zp-demo-")
    state_dir, endpoint = pool.state_dir, pool.endpoint
    report: dict = {}
    try:
        with console.status(f"starting a pool of {workers} workers on the embedded model..."):
            started = time.monotonic()
            pool.wait_ready()
        report["ready_seconds"] = round(time.monotonic() - started, 2)
        console.print(f"pool ready in {report['ready_seconds']}s at {endpoint}")
        with Client(endpoint) as client:
            report["pairs"] = score_samples(client, console)
        status = control_request(state_dir, "status")
        model_path = status["versions"][status["active"]]["path"]
        console.print(f"\n{DEMO_SECONDS:.0f}s of load ({DEMO_IN_FLIGHT} requests in flight from "
                      f"2 producer processes), rotating v1 -> v2 at {ROTATE_AT_S:.0f}s:")
        spec = LoadSpec(endpoint=endpoint, concurrency=DEMO_IN_FLIGHT, duration_s=DEMO_SECONDS)
        report["bench"] = run_bench(
            spec, spawn=False, path=None, workers=workers, state_dir=state_dir,
            rotate_at=ROTATE_AT_S, rotate_to="v2", rotate_path=model_path, json_file=None,
            plot_file=plot, as_json=as_json, console=console)
        console.print(headline(report["bench"]))
    finally:
        report["exit_code"] = pool.close()
    console.print(f"pool stopped (exit code {report['exit_code']})")
    if as_json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    bench = report["bench"]
    failed = sum(bench["errors"].values()) + bench["lost"]
    return 0 if report["exit_code"] == 0 and failed == 0 else 1


def score_samples(client: Client, console: Console) -> list[dict]:
    result = client.similarity(SAMPLE_PAIRS)
    table = Table("text a", "text b", "score", "verdict", title=f"version {result.version}")
    rows = []
    for (a, b), score in zip(SAMPLE_PAIRS, result.scores, strict=True):
        table.add_row(a, b, f"{score:.4f}", verdict(score))
        rows.append({"a": a, "b": b, "score": score, "verdict": verdict(score)})
    console.print(table)
    return rows


def headline(bench: dict) -> str:
    failed = sum(bench["errors"].values()) + bench["lost"]
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
