"""bf16 against fp32 in process: the model's own gain from bf16, the ceiling of the pool's.

Both dtypes traced (`--graph auto`), one torch thread, `Encoder.similarity` on batches of
the bench's pairs (`tooling.loadgen.make_texts`), interleaved rounds, best of each.
Run: `.venv/bin/python benchmarks/dtype_ratio.py [--path DIR] [--batches 16 32 64]`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from pool.builtin import embedded_model_path
from pool.runtime import Encoder
from tooling.loadgen import make_texts

DTYPES = ("float32", "bfloat16")


def pairs_per_s(encoder: Encoder, pairs: list[tuple[str, str]], batch: int,
                seconds: float) -> float:
    done, at, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        encoder.similarity(pairs[at:at + batch])
        at = (at + batch) % (len(pairs) - batch)
        done += batch
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--path", default=str(embedded_model_path()))
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    texts = make_texts(4096, 0, random.Random(1))
    rng = random.Random(2)
    pairs = [(rng.choice(texts), rng.choice(texts)) for _ in range(20_000)]
    encoders = {dtype: Encoder(args.path, dtype=dtype) for dtype in DTYPES}
    for batch in args.batches:
        best = dict.fromkeys(DTYPES, 0.0)
        for _ in range(args.rounds):
            for dtype, encoder in encoders.items():
                best[dtype] = max(best[dtype], pairs_per_s(encoder, pairs, batch, args.seconds))
        print(json.dumps({"batch_pairs": batch, **{k: round(v, 1) for k, v in best.items()},
                          "ratio": round(best["bfloat16"] / best["float32"], 2)}), flush=True)


if __name__ == "__main__":
    main()
