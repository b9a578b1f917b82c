"""What tokenising one batch costs: transformers' tokenizer call against the Rust tokenizer
it wraps, called directly (what pool.runtime.Encoder does).

On a GPU a worker spends a quarter of its time tokenising (py-spy, docs/benchmarks.md
session 5); this is CPU work on any machine, so it is measured on a CPU:

    python benchmarks/tokenize_cost.py [--path MODEL] [--seconds 3]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from transformers import AutoTokenizer

from pool.builtin import embedded_model_path
from pool.runtime import TokenIdEncoder
from tooling.loadgen import make_texts


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second, best of three stretches."""
    best = 0.0
    for _ in range(3):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 3:
            fn()
            calls += 1
        best = max(best, calls / elapsed)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=str(embedded_model_path()))
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.path)
    max_length = min(tokenizer.model_max_length, 512)
    direct = TokenIdEncoder(tokenizer, max_length)
    rng = random.Random(0)
    batches = {
        "128 bench sentences (64 pairs)": make_texts(128, 0, rng),
        "128 texts of 200 characters": make_texts(128, 200, rng),
        "8 texts of 2,000 characters (truncated)": make_texts(8, 2000, rng),
    }
    for label, texts in batches.items():
        def wrapped(texts: list[str] = texts) -> object:
            return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]

        def rust(texts: list[str] = texts) -> object:
            return direct(texts)

        assert wrapped() == rust(), label  # the same ids, or the comparison means nothing
        slow, fast = rate(wrapped, args.seconds), rate(rust, args.seconds)
        print(f"{label}: transformers {1000 / slow:.2f} ms, direct {1000 / fast:.2f} ms "
              f"({fast / slow:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
