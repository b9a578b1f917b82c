"""Pool throughput against in-process baselines on the same model and CPU thread budget.

  seed     one pair per forward pass in one process with THREADS torch threads (the seed)
  batched  an in-process loop of 64-pair batches, THREADS threads
  pool     `pool serve` with WORKERS single-thread workers, IN_FLIGHT requests of one pair

Every pair is distinct, so deduplication does not flatter the pool.
Usage: python benchmarks/throughput.py [--seconds 20] [--threads 2] [--in-flight 64]
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import orjson
import zmq

from pool.config import embedded_model_path
from pool.launch import PoolProcess

SUBJECTS = ["我", "你", "他们", "我的朋友", "这位老师", "那个学生", "我们公司", "小王", "她妈妈"]
VERBS = ["喜欢", "想要", "讨厌", "正在寻找", "明天要买", "昨天看到了", "经常谈论", "不太了解"]
OBJECTS = ["北京的天气", "一家新餐厅", "股票市场", "这本小说", "去上海的机票", "那部电影",
           "新的手机", "周末的计划", "健康的饮食", "人工智能"]
EN = ["the weather today", "a new restaurant", "the stock market", "this novel", "a flight",
      "that movie", "a new phone", "weekend plans", "healthy food", "machine learning"]


def sentences(seed: int = 0) -> list[str]:
    zh = [s + v + o for s, v, o in itertools.product(SUBJECTS, VERBS, OBJECTS)]
    en = [f"I {v} {o}" for v, o in itertools.product(
        ["like", "want", "hate", "look for", "talk about", "read about"], EN)]
    texts = zh + en
    random.Random(seed).shuffle(texts)
    return texts


def distinct_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    texts = sentences(seed)
    pairs = list(zip(texts[0::2], texts[1::2], strict=False))
    out = []
    for i in range(count):  # rotate partners so pairs (and, mostly, texts) do not repeat
        a, b = pairs[i % len(pairs)]
        out.append((f"{a}{i // len(pairs) or ''}", b))
    return out


def seed_way(path: str, threads: int, seconds: float) -> float:
    """The seed article's code, verbatim in spirit: one pair, one padded forward pass."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    @torch.inference_mode()
    def similarity(a: str, b: str) -> float:
        enc = tokenizer([a, b], padding=True, truncation=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        emb = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return float((emb[0] * emb[1]).sum())

    pairs = distinct_pairs(100_000, seed=1)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        similarity(*pairs[done])
        done += 1
    return done / (time.perf_counter() - start)


def batched_loop(path: str, threads: int, seconds: float, batch: int = 64) -> float:
    import torch

    from pool.runtime import Encoder

    torch.set_num_threads(threads)
    enc = Encoder(path)
    pairs = distinct_pairs(400_000, seed=2)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        enc.similarity(pairs[done : done + batch])
        done += batch
    return done / (time.perf_counter() - start)


def pool_rate(path: str, workers: int, seconds: float, in_flight: int,
              max_batch: int) -> tuple[float, float, float]:
    state = Path(tempfile.mkdtemp(prefix="zp-bench-"))
    endpoint = f"ipc://{state}/front.sock"
    proc = PoolProcess(["--path", path, "--workers", str(workers), "--threads", "1",
                        "--bind", endpoint, "--state-dir", str(state),
                        "--max-batch", str(max_batch)], state / "serve.log")
    try:
        proc.wait_ready(endpoint, workers=workers, timeout=300)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(endpoint)
        pairs = distinct_pairs(1_000_000, seed=3)
        sent: dict[bytes, float] = {}
        latencies: list[float] = []
        n = 0

        def send() -> None:
            nonlocal n
            rid = n.to_bytes(8, "little")
            body = orjson.dumps({"pairs": [pairs[n]]})
            sent[rid] = time.perf_counter()
            sock.send_multipart([b"ZP1", rid, b"similarity", b"", body])
            n += 1

        for _ in range(in_flight):
            send()
        start = time.perf_counter()
        done = 0
        while time.perf_counter() - start < seconds:
            _, rid, status, _ = sock.recv_multipart()
            assert status == b"ok"
            latencies.append(time.perf_counter() - sent.pop(rid))
            done += 1
            send()
        elapsed = time.perf_counter() - start
        while sent:
            _, rid, _, _ = sock.recv_multipart()
            sent.pop(rid, None)
        sock.close()
        q = statistics.quantiles(latencies, n=100)
        return done / elapsed, q[49] * 1000, q[98] * 1000
    finally:
        proc.stop()
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--in-flight", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--path", default=str(embedded_model_path()))
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"model {Path(args.path).name}; {args.threads} threads in total; {args.seconds}s each")
    seed = seed_way(args.path, args.threads, args.seconds)
    print(f"seed     (1 pair/forward, {args.threads} threads):   {seed:8.1f} pairs/s")
    batched = batched_loop(args.path, args.threads, args.seconds)
    print(f"batched  (64 pairs/forward, {args.threads} threads): {batched:8.1f} pairs/s")
    rate, p50, p99 = pool_rate(args.path, args.threads, args.seconds, args.in_flight,
                               args.max_batch)
    print(f"pool     ({args.threads} workers x 1 thread, {args.in_flight} in flight): "
          f"{rate:8.1f} pairs/s  p50 {p50:.1f} ms  p99 {p99:.1f} ms")
    print(f"pool / batched = {rate / batched:.2f}x   pool / seed = {rate / seed:.2f}x")


if __name__ == "__main__":
    main()
