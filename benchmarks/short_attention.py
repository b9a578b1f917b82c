"""A graph per width band (pool.attention: fp32 softmax up to SHORT_PASS_TOKENS wide) against
one graph (SDPA at every width): the same Encoder, one process, one thread, interleaved
half-second slices, so a drift of the machine hits both alike; the median of the per-slice
ratios.

Run: `.venv/bin/python benchmarks/short_attention.py [--path DIR] [--dtype bfloat16]
[--pairs 16] [--chars 0]` (chars: 0 = the bench's sentences, N = synthetic texts of N chars).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import pool.runtime as runtime
from pool import attention
from pool.builtin import embedded_model_path
from tooling.loadgen import make_texts

SLICES = 20
SLICE_S = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--path", default=str(embedded_model_path()))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--chars", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    encoder = runtime.Encoder(args.path, dtype=args.dtype)
    texts = make_texts(4096, args.chars, random.Random(0))
    pairs = list(zip(texts[::2], texts[1::2], strict=True))
    widths = {"one_graph": 0, "bands": runtime.SHORT_PASS_TOKENS}
    rates: dict[str, list[float]] = {name: [] for name in widths}
    at = 0
    for _ in range(SLICES):
        for name, short in widths.items():
            # 0: no pass is short or narrow, SDPA everywhere
            runtime.SHORT_PASS_TOKENS = short
            runtime.NARROW_PASS_TOKENS = min(short, attention.NARROW_PASS_TOKENS)
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < SLICE_S:
                encoder.similarity(pairs[at:at + args.pairs])
                at = (at + args.pairs) % (len(pairs) - args.pairs)
                done += args.pairs
            rates[name].append(done / (time.perf_counter() - start))
    ratios = [n / o for n, o in zip(rates["bands"], rates["one_graph"], strict=True)]
    print(json.dumps({"dtype": args.dtype, "pairs": args.pairs, "chars": args.chars,
                      **{k: round(statistics.median(v), 1) for k, v in rates.items()},
                      "median_ratio": round(statistics.median(ratios), 3),
                      "min": round(min(ratios), 3), "max": round(max(ratios), 3)}))


if __name__ == "__main__":
    main()
