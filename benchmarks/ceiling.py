"""The most process parallelism can give on this machine, without router or producers.

N processes x 1 torch thread vs 1 process x N threads of the pool's own batched loop
(`tooling.baseline.batched_pairs_per_s`), same pairs, for each batch size: the ratio is the
ceiling of "pool / in-process batched loop" here. Run: `.venv/bin/python benchmarks/ceiling.py`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pool.builtin import embedded_model_path
from tooling.loadgen import make_texts


def measure(threads: int, batch: int, seconds: float, out: mp.Queue) -> None:
    from tooling.baseline import batched_pairs_per_s

    texts = make_texts(4000, 0, random.Random(0))
    pairs = list(zip(texts[::2], texts[1::2], strict=True))
    out.put(batched_pairs_per_s(str(embedded_model_path()), threads, seconds, pairs, batch))


def total_pairs_per_s(processes: int, threads: int, batch: int, seconds: float) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=measure, args=(threads, batch, seconds, out))
             for _ in range(processes)]
    for proc in procs:
        proc.start()
    total = sum(out.get(timeout=seconds + 300) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 32])
    args = parser.parse_args()
    for batch in args.batches:
        one = total_pairs_per_s(1, args.cores, batch, args.seconds)
        many = total_pairs_per_s(args.cores, 1, batch, args.seconds)
        print(f"batch {batch}: 1 process x {args.cores} threads {one:.1f} pairs/s, "
              f"{args.cores} processes x 1 thread {many:.1f} pairs/s ({many / one:.2f}x)")


if __name__ == "__main__":
    main()
