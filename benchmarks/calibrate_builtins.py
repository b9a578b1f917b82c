"""The built-in models' verdict thresholds (pool.builtin.MINILM_THRESHOLDS, E5_THRESHOLDS),
computed: pool/data/zh_pairs.tsv scored in-process in fp32 by each built-in, as a worker
scores it (raw texts, mean pooling, cosine), then pool.quality.evaluate at the seed's
thresholds and at the fitted ones. One JSON line per model:

    PYTHONPATH=. python benchmarks/calibrate_builtins.py [--model builtin:minilm ...]

builtin:multilingual-e5-small is converted into the model cache on first use (~10-30 s).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from pool.builtin import BUILTIN_PREFIX, BUILTINS, builtin_thresholds, resolve_model_path
from pool.quality import SEED_THRESHOLDS, evaluate, load_default_pairs
from pool.thresholds import thresholds_to_json

SCORE_BATCH_PAIRS = 64  # pairs per forward pass: any size gives the same fp32 scores
FIGURE_DIGITS = 4
SCORE_THREADS = 1  # leaves the other core to whatever else runs; scores are the same


def calibrate(spec: str) -> dict[str, Any]:
    import torch

    from pool.runtime import Encoder

    started = time.perf_counter()
    path = resolve_model_path(spec)
    torch.set_num_threads(SCORE_THREADS)
    encoder = Encoder(path, dtype="float32", graph="eager")
    pairs = load_default_pairs()
    scores: list[float] = []
    for start in range(0, len(pairs), SCORE_BATCH_PAIRS):
        chunk = pairs[start:start + SCORE_BATCH_PAIRS]
        scores += encoder.similarity([(p.text_a, p.text_b) for p in chunk])
    report = evaluate(scores, [p.label for p in pairs], SEED_THRESHOLDS)
    stored = builtin_thresholds(path)
    return {
        "model": spec, "pairs": report.n, "spearman": rounded(report.spearman),
        "auc": rounded(report.auc), "score_min": rounded(min(scores)),
        "score_max": rounded(max(scores)),
        "seed_thresholds": thresholds_to_json(report.thresholds),
        "seed_accuracy": rounded(report.accuracy),
        "fitted_thresholds": [rounded(x) for x in thresholds_to_json(report.fitted_thresholds)],
        "fitted_accuracy": rounded(report.fitted_accuracy),
        # What pool.builtin holds now, and its accuracy here (after rounding the constants).
        "stored_thresholds": None if stored is None else thresholds_to_json(stored),
        "stored_accuracy": None if stored is None else rounded(
            evaluate(scores, [p.label for p in pairs], stored).accuracy),
        "seconds": round(time.perf_counter() - started, 1),
    }


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, FIGURE_DIGITS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append",
                        help="a built-in (default: every one)")
    args = parser.parse_args()
    for spec in args.model or [BUILTIN_PREFIX + name for name in BUILTINS]:
        print(json.dumps(calibrate(spec), ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
