"""Requests/s through `pool http` against protocol v1 on the same pool, and uvicorn against
granian as the door's server. Closed loop, CONCURRENCY requests in flight, one short text per
embed request (so the transport, not the model, is what is measured), SECONDS each, runs
interleaved. Usage: [CONCURRENCY=N] python benchmarks/http_door.py [SECONDS] [ROUNDS]

The load generator is this process (aiohttp for HTTP: faster than httpx); on a small machine it
shares the cores with the pool and the door, so compare the figures with each other only.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONCURRENCY = int(os.environ.get("CONCURRENCY", "32"))  # 1: the added latency per request
TEXT = "hello world"
ROOT = Path(__file__).resolve().parent.parent


def factory():  # granian's --factory target: settings from the environment
    from router.http import HttpSettings, build_app

    return build_app(HttpSettings(os.environ["ZEROPOOL_ENDPOINT"]))


async def zmq_load(endpoint: str, seconds: float) -> float:
    from router.client import AsyncClient

    done = 0
    async with AsyncClient(endpoint) as client:
        deadline = time.monotonic() + seconds

        async def loop() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                await client.embed([TEXT])
                done += 1

        await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))
    return done / seconds


async def http_load(url: str, seconds: float) -> float:
    import aiohttp

    done, failed = 0, 0
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.monotonic() + seconds

        async def loop() -> None:
            nonlocal done, failed
            while time.monotonic() < deadline:
                async with session.post(f"{url}/v1/embeddings", json={"input": [TEXT]}) as r:
                    await r.read()
                    if r.status == 200:
                        done += 1
                    else:
                        failed += 1

        await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))
    assert not failed, f"{failed} failed requests"
    return done / seconds


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from tests.support import make_tiny_bert, start_pool, stop_pool
    from tooling.launch import wait_http

    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    model = make_tiny_bert(Path(tempfile.mkdtemp()) / "tiny", seed=1)
    pool = start_pool(model, workers=1)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ZEROPOOL_ENDPOINT": pool.endpoint}
    doors = {
        "uvicorn": [sys.executable, "-m", "cli.main", "http", "--port", "18081"],
        "granian": [sys.executable, "-m", "granian", "--interface", "asgi", "--factory",
                    "--port", "18082", "--workers", "1", "--log-level", "warning",
                    "benchmarks.http_door:factory"],
    }
    urls = {"uvicorn": "http://127.0.0.1:18081", "granian": "http://127.0.0.1:18082"}
    procs = {name: subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
             for name, cmd in doors.items()}
    try:
        for url in urls.values():
            wait_http(url, timeout=30.0)
        results: dict[str, list[float]] = {"zmq": [], **{name: [] for name in doors}}
        for _ in range(rounds):
            results["zmq"].append(asyncio.run(zmq_load(pool.endpoint, seconds)))
            for name, url in urls.items():
                results[name].append(asyncio.run(http_load(url, seconds)))
        for name, figures in results.items():
            shown = ", ".join(f"{f:.0f}" for f in figures)
            print(f"{name:8s} req/s: {shown}  (mean {sum(figures) / len(figures):.0f})")
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=30)
        stop_pool(pool)


if __name__ == "__main__":
    main()
