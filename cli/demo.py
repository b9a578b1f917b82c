"""`pool demo`: start a pool on the embedded model, score sample pairs, load it briefly, stop."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from pool.control import control_request
from pool.launch import PoolProcess
from router.client import Client, Similarity, verdict

SAMPLE_PAIRS = [
    ("今天天气真好", "今日阳光明媚"),
    ("我想订一张去北京的机票", "帮我买一张到北京的飞机票"),
    ("这家餐厅的菜很好吃", "股票市场今天大跌"),
    ("The weather is lovely today", "It is sunny and warm outside"),
    ("How do I reset my password?", "I forgot my login credentials"),
    ("The cat sat on the mat", "Quarterly revenue grew by 8%"),
]
LOAD_SECONDS = 5.0
LOAD_IN_FLIGHT = 64


def run_demo(workers: int, path: str | None, as_json: bool) -> int:
    console = Console(stderr=as_json)
    state_dir = Path(tempfile.mkdtemp(prefix="zp-demo-"))
    endpoint = f"ipc://{state_dir}/front.sock"
    args = ["--workers", str(workers), "--bind", endpoint, "--state-dir", str(state_dir)]
    if path:
        args += ["--path", path]
    report: dict = {}
    try:
        with console.status(f"starting a pool of {workers} workers on the embedded model..."):
            pool = PoolProcess(args, state_dir / "serve.log")
            started = time.monotonic()
            pool.wait_ready(endpoint, workers=workers, timeout=300)
        report["ready_seconds"] = round(time.monotonic() - started, 2)
        console.print(f"pool ready in {report['ready_seconds']}s at {endpoint}")
        with Client(endpoint) as client:
            report["pairs"] = score_samples(client, console)
            report["load"] = short_load(client, console)
        status = control_request(state_dir, "status")
        report["workers"] = [{k: w[k] for k in ("id", "pid", "served")}
                             for w in status["workers"]]
        code = pool.stop()
        report["exit_code"] = code
        console.print(f"pool stopped (exit code {code})")
    finally:
        if "exit_code" not in report and "pool" in locals():
            pool.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    if as_json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return 0 if report["exit_code"] == 0 and report["load"]["errors"] == 0 else 1


def score_samples(client: Client, console: Console) -> list[dict]:
    result = client.similarity(SAMPLE_PAIRS)
    table = Table("text a", "text b", "score", "verdict", title=f"version {result.version}")
    rows = []
    for (a, b), score in zip(SAMPLE_PAIRS, result.scores, strict=True):
        table.add_row(a, b, f"{score:.4f}", verdict(score))
        rows.append({"a": a, "b": b, "score": score, "verdict": verdict(score)})
    console.print(table)
    return rows


def short_load(client: Client, console: Console) -> dict:
    """A few seconds of 64 single-pair requests in flight: throughput and errors."""
    batches = [[pair] for pair in SAMPLE_PAIRS]
    done = errors = 0
    started = time.monotonic()
    with console.status(f"{LOAD_SECONDS:.0f}s of load, {LOAD_IN_FLIGHT} requests in flight..."):
        while time.monotonic() - started < LOAD_SECONDS:
            results = client.similarity_many(batches * 32, in_flight=LOAD_IN_FLIGHT)
            done += len(results)
            errors += sum(1 for r in results if not isinstance(r, Similarity))
    elapsed = time.monotonic() - started
    load = {"requests": done, "errors": errors, "seconds": round(elapsed, 2),
            "requests_per_s": round(done / elapsed, 1)}
    console.print(f"served {done} requests in {elapsed:.1f}s ({load['requests_per_s']}/s), "
                  f"{errors} failed")
    return load
