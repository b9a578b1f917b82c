"""What one forward pass costs, and what least-cost pass planning buys (docs/benchmarks.md).

Fits t = fixed + per_token x tokens for the embedded model at --threads, then runs
`Encoder.similarity` on batches of --batch pairs with one padded pass per batch vs the
least-cost plan, interleaved --rounds times. Run: `.venv/bin/python benchmarks/forward_cost.py`.
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from pool.builtin import embedded_model_path
from pool.runtime import Encoder
from tooling.loadgen import make_texts

ONE_PASS = 10**9  # an overhead no padding can outweigh: the whole batch in one pass
SHAPES = [(1, 8), (1, 16), (8, 16), (32, 16), (64, 16), (128, 12), (128, 18)]


def seconds_per_pass(encoder: Encoder, rows: int, width: int) -> float:
    ids = [[101] + [2000] * (width - 2) + [102]] * rows
    encoder._forward(ids)
    repeats = max(3, 2000 // (rows * width))
    start = time.perf_counter()
    for _ in range(repeats):
        encoder._forward(ids)
    return (time.perf_counter() - start) / repeats


def pairs_per_s(encoder: Encoder, pairs: list[tuple[str, str]], batch: int,
                overhead: int, seconds: float) -> float:
    encoder.overhead_tokens = overhead
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        i = done % len(pairs)
        encoder.similarity(pairs[i : i + batch])
        done += min(batch, len(pairs) - i)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder = Encoder(str(embedded_model_path()))
    planned = encoder.overhead_tokens
    times = {(r, w): seconds_per_pass(encoder, r, w) for r, w in SHAPES}
    tokens = [r * w for r, w in SHAPES]
    mean_x = sum(tokens) / len(tokens)
    mean_y = sum(times.values()) / len(times)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(tokens, times.values(),
                                                            strict=True))
    slope /= sum((x - mean_x) ** 2 for x in tokens)
    fixed = mean_y - slope * mean_x
    for (rows, width), t in times.items():
        print(f"{rows:4d} x {width:3d} tokens: {t * 1000:7.2f} ms")
    print(f"fit: {fixed * 1000:.1f} ms + {slope * 1000:.3f} ms/token = a pass costs "
          f"{fixed / slope:.0f} tokens' worth (the encoder measured {planned} at load)")
    texts = make_texts(4000, 0, random.Random(0))
    pairs = list(zip(texts[::2], texts[1::2], strict=True))
    pairs_per_s(encoder, pairs, args.batch, planned, 2)  # warm
    for round_ in range(1, args.rounds + 1):
        one = pairs_per_s(encoder, pairs, args.batch, ONE_PASS, args.seconds)
        least = pairs_per_s(encoder, pairs, args.batch, planned, args.seconds)
        print(f"round {round_}: {args.threads} thread(s), {args.batch} pairs: one pass "
              f"{one:.1f} pairs/s, least-cost passes {least:.1f} pairs/s ({least / one:.2f}x)")


if __name__ == "__main__":
    main()
