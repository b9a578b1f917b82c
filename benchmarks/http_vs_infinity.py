"""zeropool's HTTP door (`pool http` in front of `pool serve`) against Infinity's HTTP server
(`infinity_emb v2`, michaelfeil/infinity) serving the same model: requests/s and p50 / p99
latency of `POST /v1/embeddings`, one short text per request, closed loop at each of
--concurrency requests in flight, --seconds per run, the two servers' runs interleaved
(zeropool, infinity, zeropool, infinity, ...).

Both serve the same local model directory (default: the embedded all-MiniLM-L6-v2) in float32
on the CPU with the same torch thread budget (--threads): zeropool as `pool serve --workers 1
--threads N --dtype float32` plus one `pool http`, Infinity as one `infinity_emb v2 --engine
torch --device cpu --dtype float32` process with OMP_NUM_THREADS=N. Infinity conflicts with
zeropool's dependencies: install it in a venv of its own and pass its `infinity_emb` with
--infinity-bin. Or pass --zeropool-url / --infinity-url to measure servers already running.

The texts are `tooling.loadgen.make_texts(4096, 0, ...)` (the bench's short sentences,
Chinese and English), sent in the same order to both. The load generator is this process
(aiohttp on uvloop, bodies encoded beforehand); on a small machine it shares the cores with
the servers. Before each series it waits until the 1-minute load average is under
--max-load; every run records the CPU the servers, the load generator and everything else on
the machine used during it ("others": work that is not this benchmark's).

Run: PYTHONPATH=. .venv/bin/python benchmarks/http_vs_infinity.py \
         --infinity-bin /tmp/infvenv/bin/infinity_emb [--threads 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("zeropool", "infinity")


@dataclass
class Server:
    name: str
    url: str
    model: str  # the request's "model" field
    pids: list[int] = field(default_factory=list)  # roots whose process trees are counted
    stop: list = field(default_factory=list)  # callables, run in reverse order


def tree_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by these processes and their children."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
    return total


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) \
        + getattr(t, "steal", 0)


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def wait_quiet(max_load: float, wait_s: float) -> list[float]:
    """Until the 1-minute load average is under max_load (at most wait_s); the load then."""
    deadline = time.monotonic() + wait_s
    while True:
        load = list(os.getloadavg())
        if load[0] < max_load:
            return load
        if time.monotonic() > deadline:
            print(f"load {load[0]:.2f} still >= {max_load} after {wait_s:.0f}s: measuring "
                  f"anyway (flagged in the JSON)", flush=True)
            return load
        print(f"  load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} >= {max_load}: waiting",
              flush=True)
        time.sleep(15)


def start_zeropool(model: str, threads: int, port: int, log_dir: Path) -> Server:
    from tooling.launch import PoolProcess, wait_http

    state = Path(tempfile.mkdtemp(prefix="zpvi-", dir="/tmp"))  # short: ipc path limit
    endpoint = f"ipc://{state}/front.sock"
    pool = PoolProcess(["--path", model, "--workers", "1", "--threads", str(threads),
                        "--dtype", "float32", "--bind", endpoint, "--state-dir", str(state)],
                       log_dir / "zeropool-serve.log")
    pool.wait_ready(endpoint, workers=1, timeout=300)
    url = f"http://127.0.0.1:{port}"
    door_log = open(log_dir / "zeropool-http.log", "ab")  # noqa: SIM115 - closed by stop
    door = subprocess.Popen([sys.executable, "-m", "cli.main", "http", "--endpoint", endpoint,
                             "--port", str(port)], stdout=door_log, stderr=subprocess.STDOUT)

    def stop_door() -> None:
        door.terminate()
        door.wait(timeout=30)
        door_log.close()

    def stop_pool() -> None:
        pool.stop(timeout=60)
        shutil.rmtree(state, ignore_errors=True)

    server = Server("zeropool", url, "default", [pool.pid, door.pid], [stop_pool, stop_door])
    wait_http(url, "/health", timeout=300.0)
    return server


def start_infinity(binary: str, model: str, threads: int, batch_size: int, port: int,
                   log_dir: Path) -> Server:
    from tooling.launch import wait_http

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        # as zeropool's CPU workers: the Rust tokenizer on the calling thread only
        "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
    })
    cmd = [binary, "v2", "--model-id", model, "--served-model-name", "minilm",
           "--engine", "torch", "--device", "cpu", "--dtype", "float32",
           "--batch-size", str(batch_size), "--no-compile", "--no-bettertransformer",
           "--url-prefix", "/v1", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning"]
    log = open(log_dir / "infinity.log", "ab")  # noqa: SIM115 - closed by stop
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()

    server = Server("infinity", f"http://127.0.0.1:{port}", "minilm", [proc.pid], [stop])
    try:
        wait_http(server.url, "/health", timeout=300.0)
        wait_http(server.url, "/v1/models", timeout=300.0)
    except BaseException:
        stop()
        raise
    return server


async def http_load(server: Server, bodies: list[bytes], concurrency: int,
                    seconds: float) -> dict:
    """Closed loop: `concurrency` requests in flight for `seconds`; each request's latency."""
    import aiohttp

    latencies: list[float] = []
    failures: dict[str, int] = {}
    counter = itertools.count()
    url = f"{server.url}/v1/embeddings"
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        deadline = start + seconds

        async def loop() -> None:
            while (sent := time.perf_counter()) < deadline:
                body = bodies[next(counter) % len(bodies)]
                try:
                    async with session.post(url, data=body, headers=headers) as reply:
                        await reply.read()
                        status = reply.status
                except aiohttp.ClientError as exc:
                    status = type(exc).__name__
                if status == 200:
                    latencies.append(time.perf_counter() - sent)
                else:
                    failures[str(status)] = failures.get(str(status), 0) + 1

        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"latencies": latencies, "failures": failures, "elapsed": elapsed}


def measure(server: Server, servers: dict[str, Server], bodies: list[bytes],
            concurrency: int, seconds: float) -> dict:
    import numpy as np

    load = list(os.getloadavg())
    cpu0 = {name: tree_cpu(s.pids) for name, s in servers.items()}
    gen0, busy0 = own_cpu(), machine_busy()
    out = run_async(http_load(server, bodies, concurrency, seconds))
    cpu1 = {name: tree_cpu(s.pids) for name, s in servers.items()}
    gen1, busy1 = own_cpu(), machine_busy()
    lat = np.array(out["latencies"]) * 1000
    elapsed = out["elapsed"]
    used = {name: cpu1[name] - cpu0[name] for name in servers}
    others = (busy1 - busy0) - sum(used.values()) - (gen1 - gen0)
    return {
        "server": server.name, "concurrency": concurrency, "seconds": round(elapsed, 3),
        "requests": len(lat), "failures": out["failures"],
        "rps": len(lat) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "latencies_ms": lat.round(3).tolist(),
        # CPU during the run, in cores (CPU seconds / wall seconds)
        "cpu_server": used[server.name] / elapsed,
        "cpu_idle_server": sum(v for k, v in used.items() if k != server.name) / elapsed,
        "cpu_loadgen": (gen1 - gen0) / elapsed,
        "cpu_others": max(others, 0.0) / elapsed,
        "loadavg_before": load,
    }


def run_async(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def check_same_model(servers: dict[str, Server], texts: list[str]) -> float:
    """Both servers embed the same texts: the lowest cosine between their vectors."""
    import httpx
    import numpy as np

    vectors = {}
    for name, server in servers.items():
        reply = httpx.post(f"{server.url}/v1/embeddings", timeout=60,
                           json={"input": texts, "model": server.model})
        reply.raise_for_status()
        data = sorted(reply.json()["data"], key=lambda d: d["index"])
        vectors[name] = np.array([d["embedding"] for d in data], dtype=np.float64)
    a, b = (vectors[name] for name in SERVERS)
    assert a.shape == b.shape, f"{a.shape} != {b.shape}"
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cos.min())


def summarise(runs: list[dict]) -> list[dict]:
    import numpy as np

    rows = []
    for concurrency in dict.fromkeys(r["concurrency"] for r in runs):
        for name in SERVERS:
            mine = [r for r in runs if r["server"] == name and r["concurrency"] == concurrency]
            if not mine:
                continue
            lat = np.concatenate([np.array(r["latencies_ms"]) for r in mine])
            rows.append({
                "server": name, "concurrency": concurrency,
                "rps_runs": [round(r["rps"], 1) for r in mine],
                "rps_mean": float(np.mean([r["rps"] for r in mine])),
                "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                "p50_runs": [round(r["p50_ms"], 2) for r in mine],
                "p99_runs": [round(r["p99_ms"], 2) for r in mine],
                "cpu_server": float(np.mean([r["cpu_server"] for r in mine])),
                "cpu_loadgen": float(np.mean([r["cpu_loadgen"] for r in mine])),
                "cpu_others_max": float(max(r["cpu_others"] for r in mine)),
                "failures": sum(sum(r["failures"].values()) for r in mine),
            })
    return rows


def main() -> None:
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pool.builtin import embedded_model_path
    from tooling.loadgen import make_texts

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default=str(embedded_model_path()), help="model directory")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--seconds", type=float, default=10.0, help="per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each server per series")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="seconds of load on each server before each series (discarded)")
    parser.add_argument("--infinity-bin", default="/tmp/infvenv/bin/infinity_emb")
    parser.add_argument("--infinity-batch-size", type=int, default=32,
                        help="Infinity's --batch-size (its default)")
    parser.add_argument("--zeropool-url", help="a running `pool http` instead of starting one")
    parser.add_argument("--infinity-url", help="a running Infinity (prefix /v1, model minilm)")
    parser.add_argument("--max-load", type=float, default=1.0,
                        help="wait for the 1-minute load average to be under this")
    parser.add_argument("--max-wait", type=float, default=2400.0,
                        help="seconds to wait for it, in all")
    parser.add_argument("--json-file", type=Path)
    args = parser.parse_args()

    texts = make_texts(4096, 0, random.Random(1))
    bodies = {name: [json.dumps({"input": [t], "model": model}).encode() for t in texts]
              for name, model in (("zeropool", "default"), ("infinity", "minilm"))}
    log_dir = Path(tempfile.mkdtemp(prefix="http-vs-infinity-"))
    servers: dict[str, Server] = {}
    runs: list[dict] = []
    series: list[dict] = []
    waited_until = time.monotonic() + args.max_wait
    try:
        if args.zeropool_url:
            servers["zeropool"] = Server("zeropool", args.zeropool_url, "default")
        else:
            servers["zeropool"] = start_zeropool(args.path, args.threads, 18091, log_dir)
        if args.infinity_url:
            servers["infinity"] = Server("infinity", args.infinity_url, "minilm")
        else:
            servers["infinity"] = start_infinity(args.infinity_bin, args.path, args.threads,
                                                 args.infinity_batch_size, 18092, log_dir)
        min_cos = check_same_model(servers, texts[:32])
        print(f"same vectors: lowest cosine between the servers over 32 texts {min_cos:.6f}",
              flush=True)
        for concurrency in args.concurrency:
            load = wait_quiet(args.max_load, max(waited_until - time.monotonic(), 0))
            print(f"series: {concurrency} in flight, load {load[0]:.2f} {load[1]:.2f} "
                  f"{load[2]:.2f}", flush=True)
            for name in SERVERS:  # warm-up, discarded
                run_async(http_load(servers[name], bodies[name], concurrency, args.warmup))
            series.append({"concurrency": concurrency, "loadavg_at_start": load,
                           "quiet": load[0] < args.max_load})
            for round_ in range(args.rounds):
                for name in SERVERS:
                    run = measure(servers[name], servers, bodies[name], concurrency,
                                  args.seconds)
                    run["round"] = round_
                    runs.append(run)
                    print(f"  {name:9s} {concurrency:3d} in flight  {run['rps']:7.1f} req/s  "
                          f"p50 {run['p50_ms']:7.2f} ms  p99 {run['p99_ms']:7.2f} ms  "
                          f"server {run['cpu_server']:.2f} cores, load gen "
                          f"{run['cpu_loadgen']:.2f}, others {run['cpu_others']:.2f}"
                          f"{'  FAILED ' + str(run['failures']) if run['failures'] else ''}",
                          flush=True)
    finally:
        for server in reversed(list(servers.values())):
            for stop in reversed(server.stop):
                stop()
    rows = summarise(runs)
    print()
    print(f"{'server':9s} {'in flight':>9s} {'req/s (runs)':>24s} {'mean':>7s} "
          f"{'p50 ms':>7s} {'p99 ms':>7s} {'cores':>6s}")
    for row in rows:
        shown = ", ".join(f"{r:.0f}" for r in row["rps_runs"])
        print(f"{row['server']:9s} {row['concurrency']:9d} {shown:>24s} {row['rps_mean']:7.0f} "
              f"{row['p50_ms']:7.2f} {row['p99_ms']:7.2f} {row['cpu_server']:6.2f}")
    result = {
        "model": args.path, "threads": args.threads, "seconds": args.seconds,
        "infinity_batch_size": args.infinity_batch_size, "min_cosine": min_cos,
        "series": series, "summary": rows,
        "runs": [{k: v for k, v in r.items() if k != "latencies_ms"} for r in runs],
        "logs": str(log_dir),
    }
    print(json.dumps(result, indent=1))
    if args.json_file:
        args.json_file.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
