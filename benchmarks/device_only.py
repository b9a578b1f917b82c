"""The device's own limit: forward passes + pooling + cosine on pre-tokenised batches already
on the device, no tokenising, no server, no Python per request (issue #15's "GPU-only loop").

    python benchmarks/device_only.py --path MODEL [--device cuda] [--pairs 16] [--batch 64]

Each pass embeds `--batch` requests of `--pairs` pairs (2 x batch x pairs texts, padded to
the longest of the pass, as a worker pads them); prints pairs/s of the passes alone.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from pool.runtime import Encoder
from tooling.loadgen import make_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--graph", default="auto")
    parser.add_argument("--pairs", type=int, default=16, help="pairs per request")
    parser.add_argument("--batch", type=int, default=64, help="requests per pass")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder = Encoder(args.path, device=args.device, dtype=args.dtype, graph=args.graph)
    texts = make_texts(8192, 0, random.Random(0))
    per_pass = 2 * args.batch * args.pairs
    batches = [encoder._batch(encoder.token_ids(texts[i:i + per_pass]))
               for i in range(0, len(texts) - per_pass + 1, per_pass)][:16]

    @torch.inference_mode()
    def one_pass(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        vectors = encoder._vectors(batch)
        return (vectors[0::2] * vectors[1::2]).sum(dim=1)

    for batch in batches:  # warm-up: first-call allocations, kernel choice, graph profiling
        one_pass(batch)
    sync = torch.cuda.synchronize if encoder.device.type == "cuda" else (lambda: None)
    sync()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        one_pass(batches[done % len(batches)])
        done += 1
    sync()
    seconds = time.perf_counter() - start
    print(json.dumps({"device": args.device, "dtype": str(encoder.dtype).removeprefix("torch."),
                      "graph": encoder.graph, "pairs_per_pass": per_pass // 2,
                      "passes": done, "pairs_per_s": round(done * per_pass / 2 / seconds, 1)}))


if __name__ == "__main__":
    main()
