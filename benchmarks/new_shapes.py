"""What a forward pass of a shape never seen before costs, against the same shape again.

Dynamic batching hands the model a new (rows, tokens) shape all the time. On CUDA, torch's
cuDNN attention builds a plan per shape; zeropool turns it off (pool.runtime.
plan_free_attention). This measures both ways, in one process, alternating:

    python benchmarks/new_shapes.py [--path MODEL] [--device cuda] [--shapes 40]

On a CPU there is nothing to switch: it prints the one figure.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from pool.builtin import embedded_model_path
from pool.runtime import Encoder

CJK = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]


def trial(encoder: Encoder, shapes: int, seed: int) -> tuple[list[float], list[float]]:
    """Milliseconds of each new shape's first pass and of its second."""
    rng = random.Random(seed)  # a fresh seed: shapes this process has not seen
    first, again = [], []
    for _ in range(shapes):
        rows, length = rng.randint(1, 128), rng.randint(4, 60)
        texts = ["".join(rng.choice(CJK) for _ in range(length)) for _ in range(rows)]
        for times in (first, again):
            start = time.perf_counter()
            encoder.embed(texts)
            if encoder.device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
    return first, again


def report(label: str, first: list[float], again: list[float]) -> None:
    print(f"{label}: new shape median {statistics.median(first):.1f} ms, max "
          f"{max(first):.1f} | same shape again median {statistics.median(again):.1f} ms, "
          f"max {max(again):.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=str(embedded_model_path()))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", type=int, default=40)
    args = parser.parse_args()
    encoder = Encoder(args.path, device=args.device)
    encoder.warm_up()
    if encoder.device.type != "cuda":
        report(args.device, *trial(encoder, args.shapes, seed=1))
        return
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}", flush=True)
    for seed, cudnn in enumerate([True, False, True, False], start=1):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        report(f"cuDNN attention {'on ' if cudnn else 'off'}", *trial(encoder, args.shapes, seed))


if __name__ == "__main__":
    main()
