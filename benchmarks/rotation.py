"""Latency before, during and after a rotation under load, and the rotation's phase timings.

Starts `pool serve` on the embedded model, keeps IN_FLIGHT single-pair requests in flight from
one raw DEALER producer, rotates to a second version (the same weights registered under
another name unless --path-v2 is given) at --before seconds, and keeps going for --after
seconds once the rotation is done.

Usage: python benchmarks/rotation.py [--strategy surge] [--before 10] [--after 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import orjson
import zmq
from throughput import distinct_pairs

from pool.config import embedded_model_path
from pool.control import control_request
from pool.launch import PoolProcess


def percentiles(latencies: list[float]) -> str:
    if len(latencies) < 2:
        return "n/a"
    q = statistics.quantiles(latencies, n=100)
    return (f"n={len(latencies):6d}  p50 {q[49] * 1000:7.1f} ms  p99 {q[98] * 1000:7.1f} ms  "
            f"max {max(latencies) * 1000:7.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--in-flight", type=int, default=64)
    ap.add_argument("--before", type=float, default=10)
    ap.add_argument("--after", type=float, default=10)
    ap.add_argument("--strategy", default="surge")
    ap.add_argument("--path", default=str(embedded_model_path()))
    ap.add_argument("--path-v2", default=None)
    args = ap.parse_args()

    state = Path(tempfile.mkdtemp(prefix="zp-rot-"))
    endpoint = f"ipc://{state}/front.sock"
    pool = PoolProcess(["--path", args.path, "--workers", str(args.workers), "--threads", "1",
                        "--bind", endpoint, "--state-dir", str(state)], state / "serve.log")
    try:
        pool.wait_ready(endpoint, workers=args.workers, timeout=300)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(endpoint)
        pairs = distinct_pairs(2_000_000, seed=4)
        sent: dict[bytes, float] = {}
        samples: list[tuple[float, float, str, bytes]] = []  # sent, latency, version, status
        n = 0

        def send() -> None:
            nonlocal n
            rid = n.to_bytes(8, "little")
            sent[rid] = time.perf_counter()
            sock.send_multipart([b"ZP1", rid, b"similarity", b"",
                                 orjson.dumps({"pairs": [pairs[n]]})])
            n += 1

        for _ in range(args.in_flight):
            send()
        t0 = time.perf_counter()
        rotate_at = t0 + args.before
        rotation_started = rotation_done = None
        next_poll = 0.0
        rotation: dict = {}
        while True:
            now = time.perf_counter()
            if rotation_started is None and now >= rotate_at:
                rotation_started = now
                control_request(state, "rotate", version="v2",
                                path=args.path_v2 or args.path, strategy=args.strategy)
            if rotation_started and rotation_done is None and now >= next_poll:
                next_poll = now + 0.1
                rotation = control_request(state, "rotation")["rotation"]
                if rotation["outcome"] is not None:
                    rotation_done = now
            if rotation_done and now - rotation_done > args.after:
                break
            if sock.poll(1000):
                _, rid, status, body = sock.recv_multipart()
                start = sent.pop(rid)
                version = orjson.loads(body).get("version", "?") if status == b"ok" else "-"
                samples.append((start, time.perf_counter() - start, version, status))
                send()
        while sent:  # collect the tail: nothing may be lost
            assert sock.poll(30_000), f"{len(sent)} requests never answered"
            _, rid, status, body = sock.recv_multipart()
            start = sent.pop(rid)
            version = orjson.loads(body).get("version", "?") if status == b"ok" else "-"
            samples.append((start, time.perf_counter() - start, version, status))
        sock.close()
        assert rotation_started is not None and rotation_done is not None
        before = [lat for s, lat, _, _ in samples if s < rotation_started]
        during = [lat for s, lat, _, _ in samples if rotation_started <= s < rotation_done]
        after = [lat for s, lat, _, _ in samples if s >= rotation_done]
        errors = sum(1 for *_, st in samples if st != b"ok")
        elapsed = time.perf_counter() - t0
        print(f"{args.workers} workers x 1 thread, {args.in_flight} in flight, "
              f"strategy {rotation['strategy']}, outcome {rotation['outcome']}")
        print(f"requests {len(samples)} (sent {n}), errors {errors}, lost {n - len(samples)}, "
              f"{len(samples) / elapsed:.1f} req/s overall")
        print(f"before  {percentiles(before)}")
        print(f"during  {percentiles(during)}")
        print(f"after   {percentiles(after)}")
        print("phases  " + ", ".join(f"{k} {v:.2f}s" for k, v in rotation["timings"].items())
              + f"; total {rotation['total_s']:.2f}s")
        if len(before) > 2 and len(during) > 2:
            ratio = statistics.quantiles(during, n=100)[98] / statistics.quantiles(
                before, n=100)[98]
            print(f"p99 during / before = {ratio:.2f}x")
    finally:
        pool.stop()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
